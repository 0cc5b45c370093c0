"""The original ``xlora`` package's format (EricLBuehler/xlora), read and written.

A directory holds ``xlora_config.json`` and ``xlora_classifier.safetensors``. The config's keys are
the package's ``xLoRAConfig`` fields (``hidden_size``, ``base_model_id``, ``adapters``,
``xlora_depth``, ``xlora_size``, ``xlora_dropout_p``, ``enable_relu_and_dropout``, ``use_bias``,
``enable_softmax``, ``softmax_temperature``, ``layerwise_scalings``, ``top_k_lora``,
``enable_softmax_topk``, ``scaling_pass_value``, ``global_scaling_weight``,
``use_trainable_adapters``); ``adapters`` is ``{name: path}`` in the early layout and a list of
names in the later one, whose ``save_pretrained`` writes each expert to ``<dir>/<name>/`` with
PEFT (and the classifier's biases into each expert's file, which we drop). The classifier's state
dict is ``inner.{i}`` (hidden linear layers; ``inner`` also holds the ReLU and Dropout modules when
``enable_relu_and_dropout``, so they sit at ``inner.0``, ``inner.3``, ...) and ``last``.

Differences we do not copy: the package's ``enable_softmax_topk`` took one softmax over the kept
scalings of the whole batch at once; ours (and PEFT's) re-normalises each token's kept experts.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xlora.adapters import CONFIG_NAME, WEIGHTS_NAME, save_expert
from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.formats._common import (
    Foreign,
    check_full_scaling_pass,
    head_linears,
    indexed_linears,
    make_config,
    read_json,
    read_tensors,
)

CONFIG_FILE = "xlora_config.json"
CLASSIFIER_FILE = "xlora_classifier.safetensors"

# xLoRAConfig key -> (our XLoraConfig field, the package's default)
FIELDS: dict[str, tuple[str, Any]] = {
    "hidden_size": ("hidden_size", None),
    "base_model_id": ("base_model_name_or_path", None),
    "xlora_depth": ("head_depth", 1),
    "xlora_size": ("head_hidden_size", 2048),
    "xlora_dropout_p": ("head_dropout", 0.2),
    "use_bias": ("head_bias", True),
    "enable_relu_and_dropout": ("head_relu_dropout", False),
    "enable_softmax": ("enable_softmax", True),
    "softmax_temperature": ("softmax_temperature", 1.0),
    "layerwise_scalings": ("layerwise_scalings", False),
    "top_k_lora": ("top_k", None),
    "enable_softmax_topk": ("enable_softmax_topk", False),
    "scaling_pass_value": ("scaling_pass_value", 0.0),
    "global_scaling_weight": ("global_scaling_weight", 1.0),
    "use_trainable_adapters": ("use_trainable_adapters", False),
}
# Keys that carry no maths for a per-token head (stop_token_id and use_mean_pool steered an early
# sequence-level classifier; device was runtime state).
IGNORED = {"adapters", "device", "stop_token_id", "model_type", "use_mean_pool"}


def is_original(data: dict[str, Any]) -> bool:
    """Whether a parsed ``xlora_config.json`` is the original package's (not ours)."""
    return "experts" not in data and any(k in data for k in ("adapters", "xlora_depth", "hidden_size"))


def config_fields(data: dict[str, Any], source: Path) -> dict[str, Any]:
    """Our XLoraConfig fields (without experts) from an original-schema config."""
    unknown = sorted(set(data) - set(FIELDS) - IGNORED)
    if unknown:
        raise ValueError(f"{str(source)!r}: unknown keys {unknown}; xlora reads {sorted(set(FIELDS) | IGNORED)}")
    if data.get("use_mean_pool"):
        raise ValueError(f"{str(source)!r}: use_mean_pool=true (one scaling per sequence from mean-pooled states) "
                         "is an early classifier xlora does not implement; only per-token heads are read")
    if not isinstance(data.get("hidden_size"), int):
        raise ValueError(f"{str(source)!r} needs hidden_size (the base model's), got {data.get('hidden_size')!r}")
    return {ours: data.get(key, default) for key, (ours, default) in FIELDS.items()}


def expert_names(data: dict[str, Any], source: Path) -> list[str]:
    adapters = data.get("adapters")
    if isinstance(adapters, dict):
        return list(adapters)
    if isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
        return adapters
    raise ValueError(f"{str(source)!r}: adapters must be a list of names or a {{name: path}} object, got {adapters!r}; "
                     "add the experts there, e.g. \"adapters\": {\"math\": \"/path/to/math_lora\"}")


def find_adapter(directory: Path, name: str, names: list[str], recorded: str | None,
                 skip: frozenset[str] = frozenset()) -> tuple[Path, Path] | None:
    """``(config file, weights file)`` of adapter ``name``: a saved ``<dir>/<name>/`` (or the early
    trainable layout ``<dir>/adapters/<name>/``), else files at the top level named after it (the
    flat layout mistral.rs reads locally; ``skip`` names files that are not adapters'), else the
    recorded path."""
    for sub in (directory / name, directory / "adapters" / name):
        if (sub / CONFIG_NAME).is_file():
            return sub / CONFIG_NAME, sub / WEIGHTS_NAME
    skip = skip | {CONFIG_FILE, CLASSIFIER_FILE}
    flat = [p for p in sorted(directory.iterdir()) if p.is_file() and name in p.name and p.name not in skip]
    for p in flat:
        owners = [n for n in names if n in p.name]
        if len(owners) > 1:
            raise ValueError(f"adapter names collide: file {p.name!r} in {str(directory)!r} contains the names "
                             f"{owners}, so it cannot be told whose it is; rename the adapters")
    weights = [p for p in flat if p.suffix == ".safetensors"]
    configs = [p for p in flat if p.suffix == ".json"]
    if len(weights) == 1 and len(configs) == 1:
        return configs[0], weights[0]
    if flat:
        raise ValueError(f"adapter {name!r}: expected one .json config and one .safetensors file named after it in "
                         f"{str(directory)!r}, found {[p.name for p in flat]}")
    if recorded is not None:
        path = Path(recorded) if Path(recorded).is_absolute() else directory / recorded
        if not path.is_dir() and Path(recorded).is_dir():
            path = Path(recorded)
        return path / CONFIG_NAME, path / WEIGHTS_NAME
    return None


def locate_experts(directory: Path, names: list[str], recorded: dict[str, str], scratch: Path,
                   skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Every expert's PEFT folder (cleaned into ``scratch`` when needed), or one error naming the missing ones."""
    from xlora.formats._common import clean_expert

    found, missing = {}, []
    for name in names:
        files = find_adapter(directory, name, names, recorded.get(name), skip)
        if files is None or not files[0].is_file():
            missing.append(f"{name!r}" + (f" ({recorded[name]})" if name in recorded else ""))
            continue
        found[name] = str(clean_expert(name, files[0], files[1], scratch).resolve())
    if missing:
        raise FileNotFoundError(
            f"experts {', '.join(missing)} of {str(directory)!r} are not there: expected a folder <dir>/<name>/ with "
            "adapter_config.json and adapter_model.safetensors, files named after the expert, or the recorded path; "
            "put the adapters back or fix 'adapters' in xlora_config.json"
        )
    return found


def read(directory: Path, names: list[str] | None = None, skip: frozenset[str] = frozenset()) -> Foreign:
    """Read an original-format directory (either layout) into a :class:`Foreign`; ``names`` (the
    expert order, e.g. a mistral.rs ordering's) overrides the config's ``adapters``."""
    source = directory / CONFIG_FILE
    data = read_json(source, "X-LoRA config file")
    fields = config_fields(data, source)
    if names is None:
        names = expert_names(data, source)
    recorded = data["adapters"] if isinstance(data.get("adapters"), dict) else {}
    scratch = tempfile.TemporaryDirectory(prefix="xlora-experts-")
    experts = locate_experts(directory, names, recorded, Path(scratch.name), skip)
    tensors = read_tensors(directory / CLASSIFIER_FILE, "X-LoRA classifier file")
    linears = classifier_linears(tensors, directory / CLASSIFIER_FILE)
    if "use_bias" not in data:  # the earliest package had no use_bias and no biases
        fields["head_bias"] = linears[-1][2] is not None
    cfg = make_config(source, experts=experts, **fields)
    used = any(Path(p).is_relative_to(Path(scratch.name).resolve()) for p in experts.values())
    return Foreign(cfg, linears, directory / CLASSIFIER_FILE, scratch=scratch if used else None)


def classifier_linears(tensors: dict[str, Any], source: Path) -> list:
    """``inner.{i}`` in index order, then ``last``; any other tensor is an error."""
    other = sorted(k for k in tensors if not k.startswith(("inner.", "last.")))
    if other:
        raise ValueError(f"{str(source)!r}: unexpected tensors {other}; an xlora classifier holds inner.<i> and last")
    if "last.weight" not in tensors:
        raise ValueError(f"{str(source)!r} has no last.weight: the classifier is incomplete")
    return [*indexed_linears(tensors, "inner.", source), ("last", tensors["last.weight"], tensors.get("last.bias"))]


def config_dict(model: Any, names: list[str], dropout: float | None = None) -> dict[str, Any]:
    """The original-schema ``xlora_config.json`` of ``model`` (adapters as a list of names)."""
    cfg = model.xlora_config
    out: dict[str, Any] = {key: getattr(cfg, ours) for key, (ours, _) in FIELDS.items()}
    out["base_model_id"] = cfg.base_model_name_or_path
    out["adapters"] = names
    if dropout is not None:
        out["xlora_dropout_p"] = dropout
    return out


def classifier_tensors(model: Any, stride: int) -> dict[str, Any]:
    """The head as ``inner.{i·stride}`` and ``last`` tensors."""
    mods = head_linears(model)
    out = {}
    for i, mod in enumerate(mods):
        name = "last" if i == len(mods) - 1 else f"inner.{i * stride}"
        out[f"{name}.weight"] = mod.weight
        if mod.bias is not None:
            out[f"{name}.bias"] = mod.bias
    return out


def write_experts(model: Any, folder_of: Callable[[str], Path]) -> None:
    """Each expert in PEFT's format at ``folder_of(name)`` (trained weights when the experts trained)."""
    trained = model.trainable_expert_weights() if model.xlora_config.use_trainable_adapters else None
    for i, expert in enumerate(model.experts):
        save_expert(expert, folder_of(expert.name), trained[i] if trained else None)


def save(model: Any, directory: str | Path) -> None:
    """Write ``model`` in the original package's later layout, experts copied into ``<dir>/<name>/``."""
    check_full_scaling_pass(model, "the original xlora package")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = model.xlora_config.expert_names
    write_experts(model, lambda name: out / name)
    stride = 3 if model.xlora_config.head_relu_dropout else 1  # inner holds Linear, ReLU, Dropout
    atomic_save_safetensors(out / CLASSIFIER_FILE, classifier_tensors(model, stride), metadata={"format": "pt"})
    atomic_write_text(out / CONFIG_FILE, json.dumps(config_dict(model, names), indent=2) + "\n")
