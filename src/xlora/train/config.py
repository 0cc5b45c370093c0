"""``TrainConfig``: every option of head training, validated on construction."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlora.config import XLoraConfig, check_bool, check_float, check_int

_MIXED_PRECISION = ("no", "fp16", "bf16")
_REGULARIZERS = ("none", "balance", "entropy")
ROUTING_TOKENS = ("all", "scored")  # the tokens routing supervision averages (xlora.train.losses.with_routing_mask)
LM_EXAMPLES = ("all", "unrouted")  # the examples that take the next-token loss (xlora.train.losses.without_routed_lm)


@dataclass
class TrainConfig:
    """Training the scaling head (and optionally the experts). Flat keys: every ``XLoraConfig`` field
    may also be given here (see :meth:`from_dict`); they are collected into :attr:`xlora`.

    Args:
        base_model: local folder (or a model id already in the Hugging Face cache) of the base causal LM.
        train_file: JSONL (or any local file ``datasets`` reads) of ``{"text"}``, ``{"prompt","completion"}``
            or ``{"messages"}`` records.
        output_dir: where the final model, ``metrics.jsonl`` and ``checkpoints/`` go.
        eval_file: optional held-out data of the same shapes.
        xlora: the X-LoRA options (the ``XLoraConfig`` fields; given flat, at least ``experts``).
        chat: render ``prompt``/``completion`` records with the tokenizer's chat template, as one user and one
            assistant turn, exactly as ``xlora generate --chat`` renders a prompt (``messages`` records always
            use the template, ``text`` records never do).
        max_length: tokens per example (longer records are truncated and counted).
        packing: concatenate examples into ``max_length`` chunks instead of padding.
        group_by_length: batch examples of similar length together (less padding).
        per_device_batch_size: examples per process per micro-batch; the global batch is
            ``per_device_batch_size · processes · gradient_accumulation_steps``.
        gradient_accumulation_steps: micro-batches per optimizer step.
        num_epochs: passes over the training data (used when ``max_steps`` is not set; may be fractional).
        max_steps: optimizer steps; ``None`` means ``num_epochs`` epochs.
        learning_rate: AdamW's peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        adam_beta1: AdamW's decay of the gradient's running mean.
        adam_beta2: AdamW's decay of the squared gradient's running mean.
        adam_epsilon: AdamW's epsilon (added to the denominator).
        warmup_steps: linear warm-up, then cosine decay to 0.
        max_grad_norm: gradient clipping (0 disables).
        seed: seeds the data order and dropout (a run is a function of its options).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (Accelerate).
        dtype: load the base in ``"float32"``, ``"bfloat16"`` or ``"float16"`` (None: the checkpoint's);
            the head (and trainable experts) stay float32 for the optimiser, as PEFT keeps adapters.
        load_in_8bit / load_in_4bit: quantise the frozen base with bitsandbytes while loading (8-bit, or
            4-bit nf4).
        gradient_checkpointing: recompute the base's decoder layers in the backward pass (exact).
        log_every: write ``metrics.jsonl`` every this many steps.
        eval_every: evaluation period in steps (``None``: at checkpoints and at the end).
        save_every: write a checkpoint every this many steps (and at the end).
        keep_checkpoints: how many of the newest checkpoints to keep.
        regularizer: optional loss on the scalings: ``"none"``, ``"balance"`` (``E·Σ_e p̄_e²``, 1 when
            experts are used equally) or ``"entropy"`` (mean per-token entropy, lower = sharper).
        regularizer_weight: the regularizer's weight in the loss (0: off).
        routing_weight: weight ``w`` of routing supervision (0: off): adds ``w · mean_i -Σ_e q_i[e] log p̄_i[e]``,
            ``p̄_i`` example i's scalings averaged over its tokens and layers, ``q_i`` one-hot on the expert its
            record names (or uniform over its ``experts`` list); see ``xlora.train.routing``.
        routing_key: the record field that names an example's expert for ``routing_weight``.
        routing_tokens: the tokens whose scalings ``p̄_i`` averages: ``"all"`` (every real token) or
            ``"scored"`` (the positions that predict completion tokens, where ``xlora eval`` measures routing).
        lm_examples: which examples take the next-token loss: ``"all"``, or ``"unrouted"`` (only those without a
            routing target, e.g. composite records; the routed ones train the head through ``routing_weight``
            alone; BENCHMARKS, "Routing-only heads", measures it on the science suite).
        resume: continue from the newest valid checkpoint in ``output_dir``; only the fields in
            ``RESUMABLE_CHANGES`` (the schedule) may differ from the run's ``train_config.json``.
        overwrite: allow an existing non-empty ``output_dir`` that is not a resumable run of ours.
        bundle: copy the experts into the final output directory.
        progress: show a progress bar.
    """

    base_model: str = ""
    train_file: str = ""
    output_dir: str = ""
    eval_file: str | None = None
    xlora: XLoraConfig | None = None
    chat: bool = False
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
    routing_weight: float = 0.0
    routing_key: str = "domain"
    routing_tokens: str = "all"
    lm_examples: str = "all"
    resume: bool = False
    overwrite: bool = False
    bundle: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("base_model", "train_file", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is required (got {getattr(self, name)!r}), e.g. --{name.replace('_', '-')} PATH")
        if Path(self.output_dir).is_file():
            raise ValueError(f"output_dir {self.output_dir!r} is a file, not a folder; give a folder (--output-dir)")
        if self.xlora is None:
            raise ValueError(f"xlora (the X-LoRA options) is required: at least the experts, {EXPERTS_HOWTO}")
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
                     "max_grad_norm", "regularizer_weight", "routing_weight"):
            setattr(self, name, check_float(name, getattr(self, name)))
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "regularizer_weight", "routing_weight", "adam_epsilon"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.regularizer not in _REGULARIZERS:
            raise ValueError(f"regularizer must be one of {_REGULARIZERS}, got {self.regularizer!r}")
        self._check_routing()
        for name in ("chat", "packing", "group_by_length", "resume", "overwrite", "bundle", "progress",
                     "load_in_8bit", "load_in_4bit", "gradient_checkpointing"):
            check_bool(name, getattr(self, name))
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite starts afresh")
        from xlora.saving import base_load_kwargs  # last and here: a config error answers without torch

        base_load_kwargs(self.dtype, self.load_in_8bit, self.load_in_4bit)  # checks dtype and the quantisation

    def _check_routing(self) -> None:
        if not isinstance(self.routing_key, str) or not self.routing_key:
            raise ValueError(f"routing_key must be the name of a record field, e.g. 'domain'; got {self.routing_key!r}")
        if self.routing_tokens not in ROUTING_TOKENS:
            raise ValueError(f"routing_tokens must be one of {ROUTING_TOKENS}, got {self.routing_tokens!r}: 'scored' "
                             "routes on the positions that predict completion tokens, 'all' on every real token")
        if self.lm_examples not in LM_EXAMPLES:
            raise ValueError(f"lm_examples must be one of {LM_EXAMPLES}, got {self.lm_examples!r}")
        if self.routing_weight == 0:
            if self.lm_examples == "unrouted":
                raise ValueError("lm_examples='unrouted' leaves the routed examples to routing_weight, which is 0: "
                                 "set routing_weight > 0 or lm_examples='all'")
            return
        if self.packing:
            raise ValueError(f"routing_weight={self.routing_weight} needs one record per example, but packing=True "
                             "joins records; drop --packing or set routing_weight=0")
        if not self.xlora.enable_softmax:
            raise ValueError(f"routing_weight={self.routing_weight} needs enable_softmax=True (the term is a "
                             "cross-entropy of the scalings as a distribution over experts); set routing_weight=0 "
                             "or enable the softmax")

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: the training fields and the X-LoRA fields side by side."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "xlora"}
        out.update(self.xlora.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from flat keys (training and X-LoRA fields mixed, spelled ``base_model`` or ``base-model``);
        unknown keys are an error that suggests the closest one."""
        data = canonical_keys(data)
        own = {f.name for f in dataclasses.fields(cls)} - {"xlora"}
        xl = {f.name for f in dataclasses.fields(XLoraConfig)}
        if not data.get("experts") and not (data.get("xlora") or {}).get("experts"):
            raise ValueError(f"experts is required: {EXPERTS_HOWTO}")
        xlora = dict(data.get("xlora") or {})
        xlora.update({k: v for k, v in data.items() if k in xl})
        return cls(**{k: v for k, v in data.items() if k in own}, xlora=XLoraConfig.from_dict(xlora))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a JSON or YAML training config (see :func:`read_config_file`)."""
        return cls.from_dict(read_config_file(path))


EXPERTS_HOWTO = ('on the command line --experts NAME=PATH [NAME=PATH ...], in a config file '
                 '"experts": {"NAME": "PATH", ...}')
# Filled in from the base model, or mirrors of other keys: accepted (train_config.json round-trips) but never
# offered to a user.
_INTERNAL_KEYS = {"xlora", "hidden_size", "num_adapted_modules", "base_model_name_or_path"}
_PATH_KEYS = ("train_file", "eval_file", "output_dir")


def user_keys() -> list[str]:
    """The keys a user writes: the ``xlora train`` flags' names (``_`` or ``-``), training and X-LoRA options."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(XLoraConfig)}
    return sorted(names - _INTERNAL_KEYS)


def canonical_keys(data: Any) -> dict[str, Any]:
    """``data`` with every key spelled with ``_`` (``base-model`` -> ``base_model``); refuses unknown keys,
    naming the closest known one, and a key given in both spellings."""
    if not isinstance(data, dict):
        raise ValueError(f"a training config must be a mapping, got {type(data).__name__}")
    out: dict[str, Any] = {}
    known = set(user_keys()) | _INTERNAL_KEYS
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, user_keys(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown training config key {key!r}: {hint}The keys are the `xlora train` flags' "
                             f"names, with '_' or '-': {', '.join(user_keys())}")
        if name in out:
            raise ValueError(f"training config key {name!r} is given twice ({name!r} and its other spelling); "
                             "keep one")
        out[name] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The flat options of a JSON or YAML (``.yaml``/``.yml``, needs PyYAML) training config file.

    Keys are spelled as in :meth:`TrainConfig.from_dict`. Relative paths are resolved against the file's
    folder: ``train_file``, ``eval_file``, ``output_dir`` and the experts' folders always, ``base_model``
    when that folder exists (otherwise it is kept as given: a model id in the Hugging Face cache).
    """
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
    return _resolve_paths(canonical_keys(data), path.resolve().parent)


def _resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    def resolve(value: Any) -> Any:
        return str(folder / value) if isinstance(value, str) and value and not Path(value).is_absolute() else value

    out = {**data, **{k: resolve(data[k]) for k in _PATH_KEYS if k in data}}
    base = data.get("base_model")
    if isinstance(base, str) and base and (folder / base).is_dir():
        out["base_model"] = resolve(base)
    experts = data.get("experts")
    if isinstance(experts, dict):
        out["experts"] = {name: resolve(p) for name, p in experts.items()}
    elif isinstance(experts, list):  # the CLI form, name=path strings
        out["experts"] = [f"{n}={resolve(p)}" if isinstance(e, str) and sep else e
                          for e in experts for n, sep, p in [str(e).partition("=")]]
    return out


# The schedule: what may change when a run is resumed (--resume). Everything else defines the model (the
# X-LoRA options), the data (files, max_length, chat, packing) or the optimisation up to the checkpoint (the
# optimizer's settings, batch sizes, seed, precision, base loading), which a resumed run must keep to be the
# continuation of the same run. max_steps and num_epochs move the end (and with it the cosine decay).
RESUMABLE_CHANGES = ("max_steps", "num_epochs", "save_every", "eval_every", "log_every", "keep_checkpoints",
                     "progress", "resume", "overwrite")
_NOT_COMPARED = (*RESUMABLE_CHANGES, "output_dir")  # the run's own folder, however it is spelled
# options added after runs were recorded: a run without the key ran with this value
_UNRECORDED = {"routing_tokens": "all", "lm_examples": "all"}


def resume_conflicts(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The options of ``cfg`` that differ from a run's ``saved`` ones (its ``train_config.json``), each as
    ``"name VALUE_OF_THE_RUN -> GIVEN_VALUE"``; keys the run did not record are not compared, except those of
    ``_UNRECORDED``, which take the value the run used. Paths are equal when they name the same file."""
    given = cfg.to_dict()
    saved = {**_UNRECORDED, **saved}
    return [f"{name} {saved[name]!r} -> {given[name]!r}" for name in given
            if name in saved and name not in _NOT_COMPARED and not _same(saved[name], given[name])]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, str) and isinstance(b, str) and a != b:
        return os.path.abspath(a) == os.path.abspath(b) and os.path.exists(a)
    return a == b
