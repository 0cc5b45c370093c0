"""``TrainConfig``: every option of head training, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlora.config import XLoraConfig, check_bool, check_float, check_int

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
        dtype: load the base in ``"float32"``, ``"bfloat16"`` or ``"float16"`` (None: the checkpoint's);
            the head (and trainable experts) stay float32 for the optimiser, as PEFT keeps adapters.
        load_in_8bit / load_in_4bit: quantise the frozen base with bitsandbytes while loading.
        gradient_checkpointing: recompute the base's decoder layers in the backward pass (exact).
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
    dtype: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
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
            check_int(name, getattr(self, name), minimum)
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        for name in ("num_epochs", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                     "max_grad_norm", "regularizer_weight"):
            setattr(self, name, check_float(name, getattr(self, name)))
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
        for name in ("packing", "group_by_length", "resume", "overwrite", "bundle", "progress", "load_in_8bit",
                     "load_in_4bit", "gradient_checkpointing"):
            check_bool(name, getattr(self, name))
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite starts afresh")
        from xlora.saving import base_load_kwargs  # last and here: a config error answers without torch

        base_load_kwargs(self.dtype, self.load_in_8bit, self.load_in_4bit)  # checks dtype and the quantisation

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
