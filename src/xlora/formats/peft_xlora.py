"""PEFT's X-LoRA save (``peft_type: XLORA``), read and written.

A directory holds ``adapter_config.json`` (``peft.XLoraConfig``: ``hidden_size``, ``adapters``
``{"0": path, ...}``, ``xlora_depth``, ``xlora_size``, ``xlora_dropout_p``, softmax and top-k
knobs, ...) and ``adapter_model.safetensors`` with the classifier under
``base_model.internal_xlora_classifier.layers.{i}`` (an ``nn.Sequential``: Linear, ReLU and, when
``xlora_dropout_p > 0``, Dropout; always with bias).

PEFT reloads the experts from the paths recorded in ``adapters``; the sub-folders ``0/``, ``1/``
that its ``save_pretrained`` writes hold only part of each expert, so we never read them. peft
0.21's ``save_pretrained`` also drops every classifier layer ``layers.{i}`` whose ``i`` is an
expert's name (``"0".."N-1"``, which it filters out as "other adapters"): ``layers.0`` always, so
at best only the last layer is left. Such a file is refused (a half-random head is never loaded);
:func:`save_classifier` rewrites it whole from the live PEFT model. peft 0.22's ``save_pretrained`` keeps the
whole classifier, and its files load as they are.

Our writer names the experts ``"0".."N-1"`` as PEFT needs and keeps our names in
``xlora_names.json``, so that the export reads back as it was. Experts copied into the folder
(``bundle``, as ``xlora convert --to peft`` does) are recorded relative to it (``"0"``, ``"1"``, ...),
so the folder survives a move; experts left where they are, by absolute path. PEFT resolves a
relative path against the working directory: load from inside the folder, or from anywhere with
``PeftModel.from_pretrained(base, DIR, config=peft_config(DIR))``. Our reader resolves relative
paths against the folder.
"""

from __future__ import annotations

import json
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlora.adapters import CONFIG_NAME, WEIGHTS_NAME
from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.formats._common import (
    Foreign,
    check_full_scaling_pass,
    clean_expert,
    indexed_linears,
    make_config,
    read_json,
    read_tensors,
)
from xlora.formats.original import write_experts

PEFT_CONFIG = CONFIG_NAME
PEFT_WEIGHTS = WEIGHTS_NAME
NAMES_FILE = "xlora_names.json"
PREFIX = "base_model.internal_xlora_classifier.layers."

# peft.XLoraConfig key -> our XLoraConfig field
FIELDS = {
    "hidden_size": "hidden_size",
    "xlora_depth": "head_depth",
    "xlora_size": "head_hidden_size",
    "xlora_dropout_p": "head_dropout",
    "enable_softmax": "enable_softmax",
    "softmax_temperature": "softmax_temperature",
    "layerwise_scalings": "layerwise_scalings",
    "top_k_lora": "top_k",
    "enable_softmax_topk": "enable_softmax_topk",
    "scaling_pass_value": "scaling_pass_value",
    "global_scaling_weight": "global_scaling_weight",
    "use_trainable_adapters": "use_trainable_adapters",
    "base_model_name_or_path": "base_model_name_or_path",
}
DEFAULTS = {"xlora_depth": 1, "xlora_size": 2048, "xlora_dropout_p": 0.2, "enable_softmax": True,
            "softmax_temperature": 1.0, "layerwise_scalings": False, "top_k_lora": None, "enable_softmax_topk": False,
            "scaling_pass_value": 0.0, "global_scaling_weight": 1.0, "use_trainable_adapters": False,
            "base_model_name_or_path": None}


def is_peft(directory: Path) -> bool:
    f = directory / PEFT_CONFIG
    return f.is_file() and read_json(f, "PEFT adapter config").get("peft_type") == "XLORA"


def side_info(directory: Path, n: int) -> dict[str, Any]:
    """Our side file (names, whether the experts were bundled, head_bias), or the defaults."""
    f = directory / NAMES_FILE
    if not f.is_file():
        return {}
    info = read_json(f, "expert names file")
    if not isinstance(info.get("names"), list) or len(info["names"]) != n:
        raise ValueError(f"{str(f)!r} names {info.get('names')!r} but adapter_config.json has {n} adapters; "
                         "the files do not belong together (delete the names file to use PEFT's names)")
    return info


def locate(directory: Path, names: list[str], adapters: dict[str, str], bundled: bool, scratch: Path) -> list[str]:
    """The experts' folders: the recorded paths (our bundled copies in ``<dir>/<i>/`` when those moved)."""
    found, missing = [], []
    for i, (key, recorded) in enumerate(zip(names, adapters.values())):
        path = Path(recorded)  # absolute, or relative: to the folder if there, else PEFT's working directory
        if not path.is_absolute() and (directory / recorded / PEFT_CONFIG).is_file():
            path = directory / recorded
        if not (path / PEFT_CONFIG).is_file() and bundled and (directory / str(i) / PEFT_CONFIG).is_file():
            path = directory / str(i)
        if not (path / PEFT_CONFIG).is_file():
            missing.append(f"{key!r} ({recorded})")
            continue
        found.append(str(clean_expert(key, path / PEFT_CONFIG, path / PEFT_WEIGHTS, scratch).resolve()))
    if missing:
        raise FileNotFoundError(
            f"experts {', '.join(missing)} recorded in {str(directory / PEFT_CONFIG)!r} are gone. PEFT reloads X-LoRA "
            "experts from these paths; the sub-folders 0/, 1/, ... that its save_pretrained writes hold only part of "
            "each expert's weights and are never read. Put the adapters back at those paths, or edit 'adapters' "
            "in adapter_config.json to where they are now"
        )
    return found


def head_linears_of(directory: Path, depth: int) -> list:
    source = directory / PEFT_WEIGHTS
    tensors = read_tensors(source, "PEFT X-LoRA weights file")
    other = sorted(k for k in tensors if not k.startswith(PREFIX))
    if other:
        raise ValueError(f"{str(source)!r}: unexpected tensors {other[:5]}; PEFT's X-LoRA file holds only {PREFIX}<i>")
    linears = indexed_linears(tensors, PREFIX, source)
    if len(linears) != depth:
        raise ValueError(
            f"{str(source)!r} holds {len(linears)} of the classifier's {depth} linear layers "
            f"({[n.split('classifier.')[-1] for n, _, _ in linears]}): peft<=0.21's save_pretrained drops every "
            "classifier layer whose index is also an expert's name ('0'..'N-1'), and a half-random head is never "
            "loaded. Rewrite the file from the live PEFT model with "
            "xlora.formats.peft_xlora.save_classifier(peft_model, DIR), or export from xlora with "
            "save_pretrained(DIR, format='peft')"
        )
    return linears


def read(directory: Path) -> Foreign:
    """Read a PEFT X-LoRA directory into a :class:`Foreign`."""
    source = directory / PEFT_CONFIG
    data = read_json(source, "PEFT adapter config")
    adapters = data.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"{str(source)!r}: adapters must map names to adapter folders, got {adapters!r}")
    side = side_info(directory, len(adapters))
    names = side.get("names") or list(adapters)
    fields = {ours: data.get(key, DEFAULTS.get(key)) for key, ours in FIELDS.items()}
    linears = head_linears_of(directory, fields["head_depth"])
    if side.get("head_bias") is False:
        if any(b is not None and bool(b.any()) for _, _, b in linears):
            raise ValueError(f"{str(directory / NAMES_FILE)!r} says head_bias=false but the biases are not zero")
        linears = [(n, w, None) for n, w, _ in linears]
    scratch = tempfile.TemporaryDirectory(prefix="xlora-experts-")
    paths = locate(directory, names, adapters, bool(side.get("bundled")), Path(scratch.name))
    cfg = make_config(source, experts=dict(zip(names, paths)), head_relu_dropout=True,
                      head_bias=side.get("head_bias", True), **fields)
    used = any(Path(p).is_relative_to(Path(scratch.name).resolve()) for p in paths)
    return Foreign(cfg, linears, directory / PEFT_WEIGHTS, scratch=scratch if used else None)


def config_dict(model: Any, paths: dict[str, str]) -> dict[str, Any]:
    cfg = model.xlora_config
    out: dict[str, Any] = {"peft_type": "XLORA", "task_type": "CAUSAL_LM", "revision": None, "inference_mode": True,
                           "auto_mapping": None}
    try:
        out["peft_version"] = metadata.version("peft")
    except metadata.PackageNotFoundError:
        pass
    out.update({key: getattr(cfg, ours) for key, ours in FIELDS.items()})
    out["adapters"] = paths
    return out


def save(model: Any, directory: str | Path, bundle: bool = False) -> None:
    """Write ``model`` so that ``peft.PeftModel.from_pretrained(base, directory)`` loads it whole.

    Experts are recorded by absolute path; with ``bundle`` (or trainable experts) they are copied
    to ``<dir>/<i>/`` first and recorded as ``"<i>"``, relative to the folder, so it can be moved.
    """
    check_full_scaling_pass(model, "PEFT")
    cfg = model.xlora_config
    if cfg.head_depth > 1 and not cfg.head_relu_dropout:
        raise ValueError("PEFT's X-LoRA head always puts ReLU between its layers; this head (head_relu_dropout="
                         f"False, head_depth={cfg.head_depth}) cannot be written in PEFT's format")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = cfg.expert_names
    copy = bundle or cfg.use_trainable_adapters
    if copy:
        write_experts(model, lambda name: out / str(names.index(name)))
    paths = {str(i): str(i) if copy else str(e.path.resolve()) for i, e in enumerate(model.experts)}
    tensors = {}
    for i, mod in enumerate(model.head.layers):
        if isinstance(mod, nn.Linear):  # PEFT's Sequential has our indices (ReLU, Dropout when p > 0)
            tensors[f"{PREFIX}{i}.weight"] = mod.weight
            tensors[f"{PREFIX}{i}.bias"] = mod.bias if mod.bias is not None else torch.zeros(mod.out_features)
    atomic_save_safetensors(out / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_text(out / PEFT_CONFIG, json.dumps(config_dict(model, paths), indent=2) + "\n")
    side = {"names": names, "bundled": copy, "head_bias": cfg.head_bias}
    atomic_write_text(out / NAMES_FILE, json.dumps(side, indent=2) + "\n")


def save_classifier(peft_model: nn.Module, directory: str | Path) -> None:
    """Rewrite ``<directory>/adapter_model.safetensors`` with the whole classifier of a live PEFT X-LoRA model.

    The fix for a directory written by peft<=0.21's ``save_pretrained``, which keeps only the last
    linear layer of the classifier.
    """
    classifier = getattr(getattr(peft_model, "base_model", None), "internal_xlora_classifier", None)
    if classifier is None:
        raise ValueError(f"{type(peft_model).__name__} is not a PEFT X-LoRA model (no base_model.internal_xlora_classifier)")
    tensors = {f"base_model.internal_xlora_classifier.{k}": v for k, v in classifier.state_dict().items()}
    atomic_save_safetensors(Path(directory) / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})


def peft_config(directory: str | Path) -> Any:
    """PEFT's ``XLoraConfig`` of an X-LoRA folder with relative expert paths resolved against the folder.

    PEFT resolves them against the working directory; with this config
    ``PeftModel.from_pretrained(base, directory, config=peft_config(directory))`` loads a moved export
    from any working directory.
    """
    import peft

    folder = Path(directory).resolve()
    cfg = peft.XLoraConfig.from_pretrained(str(folder))
    cfg.adapters = {k: v if Path(v).is_absolute() else str(folder / v) for k, v in cfg.adapters.items()}
    return cfg
