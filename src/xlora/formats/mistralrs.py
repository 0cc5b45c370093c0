"""mistral.rs's X-LoRA layout: export (``xlora export-mistralrs``) and import.

What mistral.rs (0.9.5; EricLBuehler/mistral.rs ``pipeline/paths.rs``, ``xlora_models/``,
``lora/``) reads from a local X-LoRA folder, and what we write:

- ``xlora_config.json`` in the original package's schema; ``xlora_dropout_p`` is written as 0
  because mistral.rs runs the head's Dropout in training mode at inference.
- ``xlora_classifier.safetensors``: ``inner.0`` .. ``inner.{depth-2}`` (numbered by linear layer
  only) and ``last``.
- one ``<name>.adapter_config.json`` and ``<name>.adapter_model.safetensors`` per expert at the
  top level: mistral.rs lists a local folder without recursion, gives a file to the first adapter
  whose name it contains, and takes the ``.safetensors`` one as weights, any other as config.
- ``ordering.json``: ``{"order": [names in expert order], "layers": {module: l}, "base_model_id"}``,
  passed with ``--xlora-order``; ``layers`` is our ``L`` axis.

mistral.rs wants every expert to name the same ``target_modules``, one rank per expert and the
scale ``lora_alpha / r``: so each expert is written over all adapted modules (zeros where it had
none), at its largest rank (zero-padded), with ``lora_alpha = r`` and its true scale (α/r, rsLoRA
α/√r, patterns) folded into ``B``. All of that is exact.
"""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path
from typing import Any

import torch

from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.formats import original
from xlora.formats._common import Foreign, check_full_scaling_pass, head_linears, read_json

ORDERING_FILE = "ordering.json"
# model_type -> the module names mistral.rs's X-LoRA model of that architecture can adapt
ADAPTABLE = {
    **dict.fromkeys(("llama", "mistral", "gemma", "gemma2"),
                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}


def find_ordering(directory: Path) -> Path | None:
    """The ordering file at the top of ``directory`` (a JSON object with ``order`` and ``layers``)."""
    found = []
    for p in sorted(directory.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data, dict) and "order" in data and "layers" in data:
            found.append(p)
    if len(found) > 1:
        raise ValueError(f"{str(directory)!r} holds several ordering files {[p.name for p in found]}; keep one")
    return found[0] if found else None


def read_ordering(path: Path) -> dict[str, Any]:
    data = read_json(path, "mistral.rs ordering file")
    order, layers = data.get("order"), data.get("layers")
    if not isinstance(order, list) or not order or not all(isinstance(n, str) for n in order):
        raise ValueError(f"ordering file {str(path)!r}: 'order' must list the adapter names, got {order!r}")
    if len(set(order)) != len(order):
        raise ValueError(f"ordering file {str(path)!r}: 'order' repeats a name: {order}")
    if not isinstance(layers, dict) or not all(isinstance(v, int) for v in layers.values()):
        raise ValueError(f"ordering file {str(path)!r}: 'layers' must map module names to indices, got {layers!r:.80}")
    return data


def read(directory: Path, ordering: str | Path | None = None) -> Foreign:
    """Read a mistral.rs X-LoRA folder (flat or sub-folder adapters) with its ordering file."""
    path = Path(ordering) if ordering is not None else find_ordering(directory)
    if path is None:
        raise FileNotFoundError(f"{str(directory)!r} holds no mistral.rs ordering file (JSON with 'order' and "
                                "'layers'); pass it with ordering=... (CLI: --ordering FILE)")
    data = read_ordering(path)
    foreign = original.read(directory, names=data["order"], skip=frozenset({path.name}))
    foreign.layers = data["layers"]
    if foreign.config.base_model_name_or_path is None:
        foreign.config.base_model_name_or_path = data.get("base_model_id")
    foreign.ordering = path
    return foreign


# ---------------------------------------------------------------- export
def check_exportable(model: Any, out: Path) -> set[str]:
    """Refuse what mistral.rs cannot run; returns the adapted module names' last parts (target_modules)."""
    check_full_scaling_pass(model, "mistral.rs")
    cfg = model.xlora_config
    kind = getattr(model.config, "model_type", None)
    if kind not in ADAPTABLE:
        raise ValueError(f"mistral.rs has no X-LoRA model for model_type {kind!r}; it has {sorted(ADAPTABLE)}")
    if cfg.top_k is not None or cfg.enable_softmax_topk:
        raise ValueError(f"mistral.rs refuses top_k_lora and enable_softmax_topk (top_k={cfg.top_k}); export a dense head")
    if cfg.head_depth > 1 and cfg.head_hidden_size != cfg.hidden_size:
        raise ValueError(
            f"mistral.rs builds the last layer of a deeper head with the model's hidden size ({cfg.hidden_size}) as "
            f"its input, so a head with head_depth={cfg.head_depth} loads there only when head_hidden_size equals it "
            f"(it is {cfg.head_hidden_size}); train with head_hidden_size={cfg.hidden_size} or head_depth=1"
        )
    suffixes = {m.rsplit(".", 1)[-1] for m in model.adapted_modules}
    if not suffixes <= ADAPTABLE[kind]:
        raise ValueError(f"mistral.rs's {kind} X-LoRA adapts only {sorted(ADAPTABLE[kind])}; these experts adapt "
                         f"{sorted(suffixes - ADAPTABLE[kind])} too")
    adapted = set(model.adapted_modules)
    left_out = [n for n, m in model.base_model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in suffixes and n not in adapted]
    if left_out:
        raise ValueError(f"mistral.rs adapts every module named {sorted(suffixes)}, but no expert adapts "
                         f"{left_out[:3]} ({len(left_out)} in all): experts trained with layers_to_transform cannot run there")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{str(out)!r} is not empty: mistral.rs reads every file at its top level; export into a new folder")
    return suffixes


def file_names(names: list[str]) -> dict[str, str | None]:
    """Every file the export writes -> the adapter that owns it; refuses names mistral.rs would confuse."""
    files: dict[str, str | None] = {original.CONFIG_FILE: None, original.CLASSIFIER_FILE: None, ORDERING_FILE: None}
    for n in names:
        files[f"{n}.adapter_config.json"] = n
        files[f"{n}.adapter_model.safetensors"] = n
    for f, owner in files.items():
        inside = [n for n in names if n in f]
        if inside != ([owner] if owner else []):
            raise ValueError(
                f"adapter names collide in mistral.rs's layout: file {f!r} contains the names {inside}, and mistral.rs "
                "gives a file to the first adapter name it contains; rename the experts (the keys of 'experts' in "
                "xlora_config.json) so that no name is part of another or of "
                f"{[original.CONFIG_FILE, original.CLASSIFIER_FILE, ORDERING_FILE]}"
            )
    return files


def expert_tensors(model: Any, e: int) -> tuple[dict[str, torch.Tensor], int]:
    """Expert ``e`` over every adapted module at one rank, scale folded into ``B``; and that rank."""
    parts = {}
    for name, layer in zip(model.adapted_modules, model.mixture_layers()):
        weights = layer.expert_weights()
        if e in weights:
            A, B = weights[e]
            scale = float(layer.expert_scale[layer.expert_ids.index(e)])
            parts[name] = (A, B * scale)
    r = max(A.shape[0] for A, _ in parts.values())
    tensors = {}
    for name, layer in zip(model.adapted_modules, model.mixture_layers()):
        A, B = parts.get(name, (None, None))
        if A is None:  # a module this expert does not adapt: zeros, which add nothing
            A = layer.lora_A.new_zeros(0, layer.in_features)
            B = layer.lora_B.new_zeros(layer.out_features, 0)
        pad = r - A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
    return tensors, r


def write_experts(model: Any, out: Path, targets: set[str], base_id: str) -> None:
    for e, expert in enumerate(model.experts):
        tensors, r = expert_tensors(model, e)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id, "r": r,
               "lora_alpha": r, "lora_dropout": float(expert.config.get("lora_dropout", 0.0) or 0.0),
               "target_modules": sorted(targets), "bias": "none", "use_rslora": False}
        atomic_save_safetensors(out / f"{expert.name}.adapter_model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_text(out / f"{expert.name}.adapter_config.json", json.dumps(cfg, indent=2) + "\n")


def export(model: Any, out: str | Path, base_model_id: str | None = None,
           tgt_non_granular_index: int | None = None) -> str:
    """Write ``model`` in mistral.rs's X-LoRA layout to ``out``; returns the ``mistralrs serve`` command.

    Args:
        model: an :class:`~xlora.model.XLoraModel`.
        out: a new (or empty) folder.
        base_model_id: what mistral.rs loads the base from (a local path or a Hub id); recorded in
            both the config and the ordering file, which mistral.rs requires to be equal. Defaults
            to the config's ``base_model_name_or_path``.
        tgt_non_granular_index: put mistral.rs's non-granular scalings on the printed command line
            (scalings fixed after that many decoding steps, like our prompt granularity).
    """
    out = Path(out)
    targets = check_exportable(model, out)
    base_id = base_model_id or model.xlora_config.base_model_name_or_path
    if not base_id:
        raise ValueError("the model records no base model; pass base_model_id=... (CLI: --base-model-id)")
    names = model.xlora_config.expert_names
    file_names(names)
    out.mkdir(parents=True, exist_ok=True)
    write_experts(model, out, targets, base_id)
    tensors = {}
    mods = head_linears(model)
    for i, mod in enumerate(mods):
        key = "last" if i == len(mods) - 1 else f"inner.{i}"
        tensors[f"{key}.weight"] = mod.weight
        if mod.bias is not None:
            tensors[f"{key}.bias"] = mod.bias
    atomic_save_safetensors(out / original.CLASSIFIER_FILE, tensors, metadata={"format": "pt"})
    cfg = original.config_dict(model, names, dropout=0.0) | {"base_model_id": base_id}
    atomic_write_text(out / original.CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    ordering = {"order": names, "layers": {m: l for l, m in enumerate(model.adapted_modules)}, "base_model_id": base_id}
    atomic_write_text(out / ORDERING_FILE, json.dumps(ordering, indent=2) + "\n")
    warn_base_config(base_id)
    command = ["mistralrs", "serve", "-m", base_id, "--xlora", str(out), "--xlora-order", str(out / ORDERING_FILE)]
    if tgt_non_granular_index is not None:
        command += ["--tgt-non-granular-index", str(tgt_non_granular_index)]
    return shlex.join(command)


def warn_base_config(base_id: str) -> None:
    """mistral.rs 0.9.5 reads ``rope_theta`` at the top of config.json; transformers 5 nests it."""
    cfg_file = Path(base_id) / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if "rope_theta" not in cfg and theta is not None:
            warnings.warn(f"{str(cfg_file)!r} has rope_theta only under rope_parameters (transformers 5); mistral.rs "
                          f"0.9.5 needs it at the top level: add \"rope_theta\": {theta}", stacklevel=2)
