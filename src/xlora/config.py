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

from xlora._io import atomic_write_text

_EXPERT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any) -> float:
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
        scaling_pass_value: value of every scaling during the scaling pass (0 = exactly the base model).
        global_scaling_weight: ``g``, multiplies every expert's contribution.
        use_trainable_adapters: train the experts together with the head.
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
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    use_trainable_adapters: bool = False
    base_model_name_or_path: str | None = None
    hidden_size: int | None = None
    num_adapted_modules: int | None = None

    def __post_init__(self) -> None:
        self.experts = normalize_experts(self.experts)
        _check_int("head_depth", self.head_depth, 1)
        _check_int("head_hidden_size", self.head_hidden_size, 1)
        self.head_dropout = _check_float("head_dropout", self.head_dropout)
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        for name in ("head_bias", "head_relu_dropout", "enable_softmax", "enable_softmax_topk",
                     "layerwise_scalings", "use_trainable_adapters"):
            _check_bool(name, getattr(self, name))
        self.softmax_temperature = _check_float("softmax_temperature", self.softmax_temperature)
        if self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
            if self.top_k > len(self.experts):
                raise ValueError(
                    f"top_k={self.top_k} exceeds the number of experts ({len(self.experts)}); "
                    f"use a value in 1..{len(self.experts)} or None for dense mixing"
                )
        if self.enable_softmax_topk and self.top_k is None:
            raise ValueError("enable_softmax_topk=True needs top_k to be set (e.g. top_k=2)")
        self.scaling_pass_value = _check_float("scaling_pass_value", self.scaling_pass_value)
        self.global_scaling_weight = _check_float("global_scaling_weight", self.global_scaling_weight)
        if self.hidden_size is not None:
            _check_int("hidden_size", self.hidden_size, 1)
        if self.num_adapted_modules is not None:
            _check_int("num_adapted_modules", self.num_adapted_modules, 1)

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


_MIXED_PRECISION = ("no", "fp16", "bf16")
_REGULARIZERS = ("none", "balance", "entropy")


@dataclass
class TrainConfig:
    """Training the scaling head (and optionally the experts). Flat keys: every ``XLoraConfig`` field
    may also be given here (see :meth:`from_dict`); they are collected into :attr:`xlora`.

    Args:
        base_model: local directory (or cached id) of the base causal LM.
        train_file: JSONL (or any local file ``datasets`` reads) of ``{"text"}``, ``{"prompt","completion"}``
            or ``{"messages"}`` records.
        output_dir: where the final model, ``metrics.jsonl`` and ``checkpoints/`` go.
        eval_file: optional held-out data of the same shapes.
        max_length: tokens per example (longer records are truncated and counted).
        packing: concatenate examples into ``max_length`` chunks instead of padding.
        group_by_length: batch examples of similar length together (less padding).
        per_device_batch_size: examples per process per micro-batch; the global batch is
            ``per_device_batch_size · processes · gradient_accumulation_steps``.
        max_steps: optimizer steps; ``None`` means ``num_epochs`` epochs.
        warmup_steps: linear warm-up, then cosine decay to 0.
        max_grad_norm: gradient clipping (0 disables).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (Accelerate).
        save_every / keep_checkpoints: checkpoint period in steps and how many to keep.
        eval_every: evaluation period in steps (``None``: at checkpoints and at the end).
        regularizer / regularizer_weight: optional loss on the scalings: ``"balance"`` (``E·Σ_e p̄_e²``,
            1 when experts are used equally) or ``"entropy"`` (mean per-token entropy, lower = sharper).
        resume: continue from the newest valid checkpoint in ``output_dir``.
        overwrite: allow an existing non-empty ``output_dir`` that is not a resumable run of ours.
        bundle: copy the experts into the final output directory.
    """

    base_model: str = ""
    train_file: str = ""
    output_dir: str = ""
    eval_file: str | None = None
    xlora: XLoraConfig | None = None
    max_length: int = 512
    packing: bool = False
    group_by_length: bool = True
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    log_every: int = 10
    eval_every: int | None = None
    save_every: int = 100
    keep_checkpoints: int = 3
    regularizer: str = "none"
    regularizer_weight: float = 0.0
    resume: bool = False
    overwrite: bool = False
    bundle: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("base_model", "train_file", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is required (got {getattr(self, name)!r}), e.g. --{name.replace('_', '-')} PATH")
        if self.xlora is None:
            raise ValueError("xlora (the X-LoRA options, at least experts={name: path}) is required")
        if isinstance(self.xlora, dict):
            self.xlora = XLoraConfig.from_dict(self.xlora)
        for name, minimum in (("max_length", 2), ("per_device_batch_size", 1), ("gradient_accumulation_steps", 1),
                              ("warmup_steps", 0), ("seed", 0), ("log_every", 1), ("save_every", 1),
                              ("keep_checkpoints", 1)):
            _check_int(name, getattr(self, name), minimum)
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("num_epochs", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                     "max_grad_norm", "regularizer_weight"):
            setattr(self, name, _check_float(name, getattr(self, name)))
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "regularizer_weight", "adam_epsilon"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.regularizer not in _REGULARIZERS:
            raise ValueError(f"regularizer must be one of {_REGULARIZERS}, got {self.regularizer!r}")
        for name in ("packing", "group_by_length", "resume", "overwrite", "bundle", "progress"):
            _check_bool(name, getattr(self, name))
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite starts afresh")

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: the training fields and the X-LoRA fields side by side."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "xlora"}
        out.update(self.xlora.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from flat keys (training and X-LoRA fields mixed); unknown keys are an error."""
        if not isinstance(data, dict):
            raise ValueError(f"a training config must be a mapping, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)} - {"xlora"}
        xl = {f.name for f in dataclasses.fields(XLoraConfig)}
        unknown = sorted(set(data) - own - xl - {"xlora"})
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; valid keys are {sorted(own | xl)}")
        xlora = dict(data.get("xlora") or {})
        xlora.update({k: v for k, v in data.items() if k in xl})
        return cls(**{k: v for k, v in data.items() if k in own}, xlora=XLoraConfig.from_dict(xlora))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a JSON or YAML (``.yaml``/``.yml``, needs PyYAML) training config."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{str(path)!r} is YAML but PyYAML is not installed: pip install pyyaml") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"training config {str(path)!r} is not valid YAML: {err}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"training config {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)
