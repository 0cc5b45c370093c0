"""What the format modules share: a foreign model as read, loading its head into a model, and the
head and experts moved between layouts.

A foreign reader returns a :class:`Foreign`, plain data (our config, the head's linear layers in
order, and where they came from); :func:`xlora.saving.load_model` builds the model from its config
and :func:`attach_head` checks every tensor against the head the config describes and loads it. Nothing half-fits: a missing or misshapen tensor is an
error naming the file, the tensor and both shapes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from xlora.adapters import CONFIG_NAME, WEIGHTS_NAME
from xlora.config import XLoraConfig
from xlora.files import check_finite

# Keys that PEFT's and the original package's save_pretrained write into every expert's file
# (the classifier's biases and more): they belong to the X-LoRA head, not to the expert.
CLASSIFIER_MARK = "internal_xlora_classifier"

Linear = tuple[str, torch.Tensor, torch.Tensor | None]  # (name for messages, weight [out, in], bias [out] | None)


@dataclass
class Foreign:
    """An X-LoRA model read from another format, before the base model is attached.

    Attributes:
        config: our configuration; its experts are absolute adapter directories.
        linears: the head's linear layers in order, ``(name, weight [out, in], bias [out] | None)``.
        source: the file the head came from (named in errors).
        layers: a mistral.rs ordering ``{module: l}`` to check the base model against, or None.
        ordering: the file ``layers`` came from.
        scratch: a temporary folder of cleaned expert copies, kept as long as the model lives.
    """

    config: XLoraConfig
    linears: list[Linear]
    source: Path
    layers: dict[str, int] | None = None
    ordering: Path | None = None
    scratch: tempfile.TemporaryDirectory | None = None


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickle = path.with_suffix(".pt")
        hint = f" (only {pickle.name}, a pickle, is there: xlora never unpickles)" if pickle.is_file() else ""
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({err})") from None


def make_config(source: Path, **fields: Any) -> XLoraConfig:
    """Our config from a foreign file's values; a bad value is an error naming that file."""
    try:
        return XLoraConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{str(source)!r}: {err}") from None


def indexed_linears(tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> list[Linear]:
    """Linear layers stored as ``{prefix}{i}.weight`` / ``.bias``, sorted by ``i``.

    The index is a position in a module list that may also hold ReLU/Dropout modules (``inner.0``,
    ``inner.3``, ...), so only the order of the indices matters.
    """
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, kind = key[len(prefix):].partition(".")
        if not index.isdigit() or kind not in ("weight", "bias"):
            raise ValueError(f"{str(source)!r}: unexpected tensor {key!r} (expected {prefix}<i>.weight / .bias)")
        found.setdefault(int(index), {})[kind] = tensor
    out = []
    for i in sorted(found):
        if "weight" not in found[i]:
            raise ValueError(f"{str(source)!r}: {prefix}{i}.bias has no {prefix}{i}.weight")
        out.append((f"{prefix}{i}", found[i]["weight"], found[i].get("bias")))
    return out


def head_linears(model: nn.Module) -> list[nn.Linear]:
    """The scaling head's linear layers, in order."""
    return [m for m in model.head.layers if isinstance(m, nn.Linear)]


def attach_head(model: nn.Module, foreign: Foreign, directory: Path) -> None:
    """Load ``foreign``'s head into ``model`` (an XLoraModel built from ``foreign.config``), in our order.

    A temporary folder of cleaned expert copies is kept as long as ``model`` lives (with a warning).
    """
    linears = foreign.linears
    if foreign.layers is not None:
        linears = follow_ordering(model, foreign.layers, linears, foreign.ordering or foreign.source)
    load_head(model, linears, foreign.source)
    if foreign.scratch is not None:
        weakref.finalize(model, foreign.scratch.cleanup)
        warnings.warn(
            f"the experts of {str(directory)!r} were cleaned into a temporary folder that lives as long as the model; "
            "keep the model with save_pretrained(dir, bundle=True) or `xlora convert SRC DST`", stacklevel=4,
        )


def load_head(model: nn.Module, linears: list[Linear], source: Path) -> None:
    """Copy ``linears`` into the head, refusing a missing layer, a wrong shape or a non-finite value."""
    mods = head_linears(model)
    cfg = model.xlora_config
    desc = (f"head_depth={cfg.head_depth}, head_hidden_size={cfg.head_hidden_size}, hidden size "
            f"{cfg.hidden_size}, {model.num_experts} experts, {model.num_layers} adapted modules, "
            f"layerwise_scalings={cfg.layerwise_scalings}")
    if len(linears) != len(mods):
        raise ValueError(f"{str(source)!r} holds {len(linears)} linear layer(s) ({[n for n, _, _ in linears]}) "
                         f"but the head ({desc}) has {len(mods)}; the classifier does not belong to this config")
    for (name, w, b), mod in zip(linears, mods):
        want_b = None if mod.bias is None else tuple(mod.bias.shape)
        got_b = None if b is None else tuple(b.shape)
        if tuple(w.shape) != tuple(mod.weight.shape) or got_b != want_b:
            raise ValueError(
                f"{str(source)!r}: layer {name!r} has weight {tuple(w.shape)} and bias {got_b}, but the head "
                f"({desc}) needs weight {tuple(mod.weight.shape)} and bias {want_b}: the classifier was trained "
                "for another base model, other experts or another head size"
            )
        for kind, t in (("weight", w), ("bias", b)):
            if t is not None:
                check_finite(t, f"{str(source)!r}: {name}.{kind}", "retrain or restore the classifier")
    with torch.no_grad():
        for (_, w, b), mod in zip(linears, mods):
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)


def follow_ordering(model: nn.Module, layers: dict[str, int], linears: list[Linear], source: Path) -> list[Linear]:
    """Check a mistral.rs ordering against the model's adapted modules; reorder a layerwise head to ours."""
    ours = model.adapted_modules
    extra = [m for m in layers if m not in set(ours)]
    missing = [m for m in ours if m not in layers]
    if extra or missing or sorted(layers.values()) != list(range(len(ours))):
        raise ValueError(
            f"ordering file {str(source)!r}: its layers do not match the base model with these experts "
            f"({len(ours)} adapted modules): {len(extra)} name modules not adapted here {extra[:3]}, "
            f"{len(missing)} adapted modules are missing {missing[:3]}, indices {sorted(set(layers.values()))[:3]}...; "
            "it was made for another base model or other target modules: regenerate it "
            "(`xlora export-mistralrs` writes one, or mistral.rs's scripts/create_ordering.py)"
        )
    perm = [layers[m] for m in ours]  # our l -> the file's index
    name, w, b = linears[-1]
    L, E = len(ours), model.num_experts
    if not model.xlora_config.layerwise_scalings or perm == list(range(L)) or w.shape[0] != L * E:
        return linears
    idx = torch.tensor(perm)
    w = w.reshape(L, E, -1)[idx].reshape(L * E, -1)  # rows are l·E + e
    b = None if b is None else b.reshape(L, E)[idx].reshape(-1)
    return [*linears[:-1], (name, w, b)]


def check_full_scaling_pass(model: nn.Module, fmt: str) -> None:
    """Refuse a head the other formats cannot run: trained on a shortened scaling pass (they run the whole base
    model there) or reading the running mean of the states (``head_prefix_mean``)."""
    k = getattr(model.xlora_config, "scaling_pass_layers", None)
    n = getattr(model.config, "num_hidden_layers", None)
    if k is not None and (n is None or k < n):
        raise ValueError(f"{fmt}'s X-LoRA runs every decoder layer in the scaling pass, but this head was trained "
                         f"with scaling_pass_layers={k} (of {n}): its scalings would differ there; keep it in our format")
    if getattr(model.xlora_config, "head_prefix_mean", False):
        raise ValueError(f"{fmt}'s X-LoRA head reads each position's state alone, but this head was trained with "
                         "head_prefix_mean=True (it also reads the running mean of the states): keep it in our format")


def clean_expert(name: str, config_file: Path, weights_file: Path, scratch: Path) -> Path:
    """A PEFT adapter folder for expert ``name``: its own folder when it is one and holds only LoRA
    weights, else a copy in ``scratch`` without the classifier keys and under PEFT's file names."""
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"expert {name!r}: {str(f)!r} does not exist")
    try:
        with safe_open(str(weights_file), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"expert {name!r}: {str(weights_file)!r} is not a readable safetensors file ({err})") from None
    stray = [k for k in keys if CLASSIFIER_MARK in k]
    peft_dir = config_file.parent == weights_file.parent and (config_file.name, weights_file.name) == (
        CONFIG_NAME, WEIGHTS_NAME)
    if peft_dir and not stray:
        return config_file.parent
    out = scratch / name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_file, out / CONFIG_NAME)
    if stray:
        tensors = {k: v for k, v in load_file(str(weights_file)).items() if CLASSIFIER_MARK not in k}
        from safetensors.torch import save_file

        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        shutil.copyfile(weights_file, out / WEIGHTS_NAME)
    return out
