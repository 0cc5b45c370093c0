"""Reading PEFT-format LoRA adapters and checking them against the base model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (shape ``[r, in]``) and ``...lora_B.weight``
(``[out, r]``). We never unpickle: a ``.bin`` adapter is refused with the conversion to run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from xlora.files import atomic_save_safetensors, atomic_write, atomic_write_text, check_finite

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}

# adapter_config.json keys whose non-default values change LoRA's maths in ways we do not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias (lora_bias=true)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


@dataclass
class LoraModuleWeights:
    """One expert's LoRA on one module: ``Δy = scale · B · A · drop(x)``.

    Attributes:
        A: ``[r, in]``.
        B: ``[out, r]``.
        scale: ``α / r`` (or ``α / √r`` with rsLoRA).
        dropout: the expert's ``lora_dropout`` probability.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraExpert:
    """A loaded LoRA expert: its name, where it came from, its raw config and its per-module weights."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModuleWeights]


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules an expert may adapt (``nn.Linear`` and GPT-2's ``Conv1D``), in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def module_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D (whose weight is stored ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in it (or as a regex).
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module_name):
            return value
    return default


def read_adapter_config(name: str, path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"expert {name!r}: adapter directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"expert {name!r}: {str(path)!r} is not a directory; pass the adapter's folder")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"expert {name!r}: {str(cfg_file)!r} is missing; an adapter directory is what PEFT's save_pretrained writes"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"expert {name!r}: {str(cfg_file)!r} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"expert {name!r}: {str(cfg_file)!r} must hold a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"expert {name!r}: peft_type is {peft_type!r}, but X-LoRA experts must be LoRA adapters")
    for key, what in _UNSUPPORTED.items():
        value = cfg.get(key)
        if key == "lora_bias" and value is False:
            continue
        if value not in (None, False, [], {}, "none"):
            raise ValueError(f"expert {name!r}: {what} is not supported by X-LoRA (adapter_config.json has {key}={value!r})")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise ValueError(f"expert {name!r}: LoRA bias={bias!r} is not supported; retrain the expert with bias='none'")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ValueError(f"expert {name!r}: adapter_config.json needs a positive {key}, got {cfg.get(key)!r}")
    return cfg


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"expert {name!r}: {str(path)!r} holds only adapter_model.bin, a pickle, which xlora never loads; "
                "convert it once in a trusted environment with PeftModel.from_pretrained(...).save_pretrained(dir) "
                "(safetensors is PEFT's default)"
            )
        raise FileNotFoundError(f"expert {name!r}: {str(weights)!r} is missing")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"expert {name!r}: {str(weights)!r} is not a readable safetensors file ({err})") from None


def load_expert(name: str, path: str | Path, base_model: nn.Module) -> LoraExpert:
    """Load one PEFT LoRA adapter and check every module against ``base_model``.

    Raises:
        FileNotFoundError / NotADirectoryError: the directory or one of its files is missing.
        ValueError: a pickle, a corrupt file, non-finite weights, an unsupported LoRA variant, or an
            adapter made for another base model (the message names the module and both shapes).
    """
    path = Path(path)
    cfg = read_adapter_config(name, path)
    raw = _read_weights(name, path)
    _refuse_variants(name, raw)
    all_modules = dict(base_model.named_modules())
    raw = _drop_base_copies(name, raw, all_modules)
    pairs = _pair_keys(name, path, raw)
    targets = adaptable_modules(base_model)
    modules: dict[str, LoraModuleWeights] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ValueError(f"expert {name!r}: module {module!r} has no {missing} weight")
        if module not in targets:
            if module in all_modules:
                kind = type(all_modules[module]).__name__
                raise ValueError(f"expert {name!r}: module {module!r} is a {kind}, which X-LoRA cannot wrap; "
                                 "experts may target Linear and Conv1D modules, plain or quantised by bitsandbytes "
                                 "(load_in_8bit / load_in_4bit) or torchao: load the base unquantised or that way "
                                 "(GPTQ, AWQ and HQQ layers are not supported)")
            raise ValueError(
                f"expert {name!r}: module {module!r} does not exist in the base model "
                f"({type(base_model).__name__}): was the adapter trained on another base model?"
            )
        modules[module] = _module_weights(name, module, ab["A"], ab["B"], module_features(targets[module]), cfg)
    return LoraExpert(name=name, path=path, config=cfg, modules=modules)


def _refuse_variants(name: str, raw: dict[str, torch.Tensor]) -> None:
    """Name an unsupported variant before complaining about any other key: an embedding adapter also
    saves its embedding's '...base_layer.weight', which may come first."""
    for key in raw:
        if "lora_embedding_" in key:
            raise ValueError(
                f"expert {name!r}: key {key!r} adapts an embedding; embedding targets are not supported "
                "(retrain the expert without embed_tokens/wte in target_modules)"
            )
        if "lora_magnitude_vector" in key:
            raise ValueError(f"expert {name!r}: key {key!r} is a DoRA magnitude; DoRA is not supported")
        if key.endswith(".lora_B.bias"):
            raise ValueError(f"expert {name!r}: key {key!r} is a LoRA bias; retrain the expert with lora_bias=False")


def _drop_base_copies(name: str, raw: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Drop ``<module>.base_layer.weight``: the copy of an adapted embedding-like module (``lm_head``) that PEFT
    saves by default (``save_embedding_layers="auto"``). It is dropped only when it equals the base's weight
    exactly (after casting to the base's dtype), so an adapter made for another base is still refused."""
    suffix, kept = ".base_layer.weight", {}
    for key, tensor in raw.items():
        if not (key.startswith(_PREFIX) and key.endswith(suffix)):
            kept[key] = tensor
            continue
        module = key[len(_PREFIX):-len(suffix)]
        weight = getattr(modules.get(module), "weight", None)
        if module in modules and (type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point()):
            raise ValueError(
                f"expert {name!r}: key {key!r} is a saved copy of the base weight of module {module!r}, which cannot be "
                f"checked against this base model's {type(modules[module]).__name__} (quantised?); re-save the "
                "adapter with save_pretrained(..., save_embedding_layers=False)")
        if weight is None or weight.shape != tensor.shape or not torch.equal(
                tensor.to(device=weight.device, dtype=weight.dtype), weight.detach()):
            raise ValueError(
                f"expert {name!r}: key {key!r} is a saved copy of the base weight of module {module!r}, and it differs "
                "from this base model's (or the module is missing): the adapter was made for another base model "
                f"(or with a trained {module!r}); load the base it was trained on")
    return kept


def _pair_keys(name: str, path: Path, raw: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": tensor, "B": tensor}}`` from PEFT's flat keys; every tensor must be finite."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            raise ValueError(
                f"expert {name!r}: unexpected key {key!r} in {WEIGHTS_NAME}; expected "
                f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
            )
        check_finite(tensor, f"expert {name!r}: {str(path / WEIGHTS_NAME)!r} tensor {key!r}",
                     "the adapter file is corrupt or its training diverged; retrain or restore it")
        pairs.setdefault(key[len(_PREFIX):-len(suffix)], {})[_SUFFIXES[suffix]] = tensor
    if not pairs:
        raise ValueError(f"expert {name!r}: {str(path / WEIGHTS_NAME)!r} holds no LoRA weights")
    return pairs


def _module_weights(name: str, module: str, A: torch.Tensor, B: torch.Tensor, features: tuple[int, int],
                    cfg: dict[str, Any]) -> LoraModuleWeights:
    """Check one module's ``A [r, in]``, ``B [out, r]`` against the base's ``(in, out)`` and the config."""
    in_f, out_f = features
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape[0] != out_f or B.shape[1] != r:
        raise ValueError(
            f"expert {name!r} adapts {module!r} with lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
            f"but the base model's module maps {in_f} -> {out_f} (needs lora_A (r, {in_f}), lora_B ({out_f}, r)): "
            "was it trained on another base model?"
        )
    expected_r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    if expected_r != r:
        raise ValueError(
            f"expert {name!r}: module {module!r} has rank {r} but adapter_config.json says r={expected_r}; "
            "the adapter files do not belong together"
        )
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r
    return LoraModuleWeights(A=A, B=B, scale=scale, dropout=float(cfg.get("lora_dropout", 0.0) or 0.0))


def load_experts(experts: dict[str, str], base_model: nn.Module, root: Path | None = None) -> list[LoraExpert]:
    """Load all experts in order; relative paths are resolved against ``root`` when given."""
    if not experts:
        raise ValueError("no experts given: X-LoRA needs at least one LoRA expert")
    loaded = []
    for name, path in experts.items():
        p = Path(path)
        if root is not None and not p.is_absolute():
            p = root / p
        loaded.append(load_expert(name, p, base_model))
    return loaded


def save_expert(expert: LoraExpert, out_dir: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Write ``expert`` to ``out_dir`` in PEFT's format.

    Without ``weights`` the original files are copied byte for byte; with ``weights``
    (``{module: (A, B)}``, e.g. after training the experts) new safetensors are written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights is None:
        for fname in (CONFIG_NAME, WEIGHTS_NAME):
            src, dst = expert.path / fname, out_dir / fname
            if src.resolve() != dst.resolve():
                atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
        return
    tensors = {}
    for module, (A, B) in weights.items():
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = B
    atomic_save_safetensors(out_dir / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(expert.config, indent=2) + "\n")
