"""Typed configuration of an X-LoRA model.

One source of truth for every default; `__post_init__` raises `ValueError` naming the field,
the value received and the fix. JSON round-trips exactly and unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "xlora_config.json"  # an X-LoRA directory's config (this module: no torch, so the CLI's --help may read it)
HEAD_FILE = "xlora_head.safetensors"  # and its scaling head's state dict

LORA_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}
_EXPERT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def normalize_experts(experts: Any) -> dict[str, str]:
    """Return the experts as an ordered ``{name: path}`` dict, refusing bad names and duplicates.

    Accepts a mapping, or a sequence of ``(name, path)`` pairs or ``"name=path"`` strings (the CLI
    form), where a repeated name is an error rather than a silent overwrite.
    """
    if isinstance(experts, dict):
        pairs = list(experts.items())
    elif isinstance(experts, (list, tuple)):
        pairs = []
        for item in experts:
            if isinstance(item, str):
                name, sep, path = item.partition("=")
                if not sep:
                    raise ValueError(f"experts: entry {item!r} is not of the form name=path, e.g. 'chem=./adapters/chem'")
                pairs.append((name.strip(), path.strip()))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                raise ValueError(f"experts: entry {item!r} must be a (name, path) pair or a 'name=path' string")
    else:
        raise ValueError(f"experts must be a dict of name -> adapter directory, got {type(experts).__name__}")
    if not pairs:
        raise ValueError("experts is empty: X-LoRA needs at least one LoRA expert, e.g. experts={'bio': './bio_lora'}")
    out: dict[str, str] = {}
    for name, path in pairs:
        if not isinstance(name, str) or not _EXPERT_NAME.match(name):
            raise ValueError(
                f"experts: name {name!r} is not valid; use letters, digits, '_' and '-' (it names a folder when bundled)"
            )
        if name in out:
            raise ValueError(f"experts: duplicate expert name {name!r}; give every expert a distinct name")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"experts: path of expert {name!r} must be a directory path, got {path!r}")
        out[name] = str(path)
    return out


@dataclass
class XLoraConfig:
    """Every knob of X-LoRA (the paper's, PEFT's and the original repository's).

    Args:
        experts: ordered ``{name: adapter_dir}``; the order fixes the expert axis ``E`` of the scalings.
        head_depth: number of linear layers of the scaling head (1 = a single linear map).
        head_hidden_size: width of the head's hidden layers (unused when ``head_depth == 1``).
        head_dropout: dropout after each hidden ReLU of the head (0 disables it).
        head_bias: whether the head's linear layers have a bias.
        head_relu_dropout: put ReLU (and dropout) between the head's hidden layers.
        enable_softmax: softmax over experts of the head's logits (with ``softmax_temperature``).
        softmax_temperature: logits are divided by this before the softmax; lower is sharper.
        top_k: keep only the ``top_k`` largest scalings per token and layer (None = dense).
        enable_softmax_topk: re-normalise the kept scalings with a softmax (needs ``top_k``).
        layerwise_scalings: the head predicts ``L·E`` values (one set per adapted module) instead of ``E``.
        head_prefix_mean: the head reads ``[h_t ; mean_{s<=t} h_s]`` (width ``2·hidden``): each position's state
            and the mean of the sequence's states so far (causal, padding excluded), so a position also sees the
            text before it when the scaling pass is too shallow to have mixed it in (``scaling_pass_layers``).
        scaling_pass_value: value of every scaling during the scaling pass (0 = exactly the base model).
        global_scaling_weight: ``g``, multiplies every expert's contribution.
        use_trainable_adapters: train the experts together with the head.
        scaling_pass_layers: run only the first ``k`` decoder layers (and the final norm) in the scaling
            pass; ``None``: all of them (the paper's X-LoRA). A cheaper, different model: a token costs
            about ``1 + k / N`` base passes instead of 2, and the head must be trained for that ``k``.
        lora_dtype: dtype of the experts' weights and their matmuls (``"float32"``, ``"bfloat16"``,
            ``"float16"``, ``"float64"``); ``None``: the base model's floating dtype (its compute dtype
            when the base is quantised). Activations are cast to it and the result back.
        base_model_name_or_path: where the base model was loaded from (informational, used by loaders).
        hidden_size: filled in from the base model; a mismatch on load is an error.
        num_adapted_modules: ``L``, filled in from the base model and the experts.
    """

    experts: dict[str, str] = field(default_factory=dict)
    head_depth: int = 1
    head_hidden_size: int = 2048
    head_dropout: float = 0.2
    head_bias: bool = True
    head_relu_dropout: bool = True
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    top_k: int | None = None
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    head_prefix_mean: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    use_trainable_adapters: bool = False
    lora_dtype: str | None = None
    scaling_pass_layers: int | None = None
    base_model_name_or_path: str | None = None
    hidden_size: int | None = None
    num_adapted_modules: int | None = None

    def __post_init__(self) -> None:
        self.experts = normalize_experts(self.experts)
        check_int("head_depth", self.head_depth, 1)
        check_int("head_hidden_size", self.head_hidden_size, 1)
        self.head_dropout = check_float("head_dropout", self.head_dropout)
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        for name in ("head_bias", "head_relu_dropout", "enable_softmax", "enable_softmax_topk",
                     "layerwise_scalings", "head_prefix_mean", "use_trainable_adapters"):
            check_bool(name, getattr(self, name))
        self.softmax_temperature = check_float("softmax_temperature", self.softmax_temperature)
        if self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
            if self.top_k > len(self.experts):
                raise ValueError(
                    f"top_k={self.top_k} exceeds the number of experts ({len(self.experts)}); "
                    f"use a value in 1..{len(self.experts)} or None for dense mixing"
                )
        if self.enable_softmax_topk and self.top_k is None:
            raise ValueError("enable_softmax_topk=True needs top_k to be set (e.g. top_k=2)")
        self.scaling_pass_value = check_float("scaling_pass_value", self.scaling_pass_value)
        self.global_scaling_weight = check_float("global_scaling_weight", self.global_scaling_weight)
        if self.lora_dtype is not None and self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {sorted(LORA_DTYPES)} or None (the base model's dtype), "
                             f"got {self.lora_dtype!r}")
        if self.scaling_pass_layers is not None:
            check_int("scaling_pass_layers", self.scaling_pass_layers, 1)
        if self.hidden_size is not None:
            check_int("hidden_size", self.hidden_size, 1)
        if self.num_adapted_modules is not None:
            check_int("num_adapted_modules", self.num_adapted_modules, 1)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XLoraConfig:
        if not isinstance(data, dict):
            raise ValueError(f"an X-LoRA config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown X-LoRA config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        from xlora.files import atomic_write_text  # here, not at the top: `xlora --help` imports no torch

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> XLoraConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"X-LoRA config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"X-LoRA config file {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)
