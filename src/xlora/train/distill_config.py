"""The settings of :func:`xlora.train.distill.distill`: a typed config that refuses bad values naming the field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlora.config import CONFIG_FILE, HEAD_FILE, check_bool, check_float, check_int
from xlora.train.distill_losses import POSITIONS

LOSSES = ("kl", "mse")
REPORT_FILE = "distill.json"  # a complete run's report, in its output_dir
RUN_LOGS = ("training.json",)  # written beside a model by the runs that train it (and *.jsonl): not the model
INITS = ("teacher", "scratch")


@dataclass
class DistillConfig:
    """Distilling a teacher X-LoRA's head into a head over the first ``k`` decoder layers.

    Args:
        teacher_dir: an X-LoRA directory (any format xlora reads) whose head is the teacher.
        output_dir: where the student X-LoRA directory goes (not the teacher's).
        scaling_pass_layers: ``k``, the decoder layers the student's scaling pass runs (1..N; None: all N, to
            correct a head at its own depth, e.g. with ``routing_weight``).
        train_file: records of any shape ``xlora train`` reads (text, prompt/completion, messages).
        eval_file: held-out records for the initial and final KL and top-1 agreement, and with routing on the
            student's and teacher's own-expert routing (default: train_file).
        steps: optimizer steps.
        batch_size: examples per step.
        learning_rate: AdamW's peak learning rate (linear warm-up, then cosine decay to 0).
        warmup_steps: steps of linear warm-up.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: gradient clipping (0 disables).
        seed: seeds the data order, a scratch head's weights and dropout.
        loss: ``"kl"`` (teacher || student over the experts, needs a softmax head) or ``"mse"`` on the scalings.
        temperature: distillation temperature τ of the KL (None: the teacher's softmax_temperature).
        lm_weight: weight of the LM loss of the X-LoRA forward with the student's scalings (0: pure distillation).
        positions: the tokens the distillation averages: ``"all"`` real tokens, ``"scored"`` (those predicting a
            completion token, where ``xlora eval`` measures routing) or ``"unrouted"`` (those taking no routing
            loss: needs ``routing_weight > 0``).
        scored_weight: weight of a second distillation term over the scored positions only (those predicting a
            completion token, where answers are routed), added to the one over ``positions`` (0: off): it prices
            the answer positions that a KL averaged over every token barely sees.
        routing_weight: weight of routing supervision (0: off): ``CE = -log p̄_S[own]`` per record that names its
            expert, ``p̄_S`` the student's scalings averaged over the record's scored positions and the modules.
        routing_key: the record field that names its expert (or a list under ``experts``; as ``xlora train``).
        init: ``"teacher"`` (start from the teacher head's weights), ``"scratch"`` (a fresh head), or an X-LoRA
            directory whose head has the student's shape (e.g. an earlier student, to go on from it against the
            teacher with another recipe).
        prefix_mean: the student's ``head_prefix_mean`` (its head also reads the running mean of the states, which
            carries the prompt to a shallow pass's positions); None: the teacher's. From a teacher without it,
            ``init='teacher'`` widens the teacher's first layer with zero columns for the mean.
        chat: render prompt/completion records with the chat template, as ``xlora train --chat``.
        max_length: tokens per example (longer records are truncated).
        base_model: base model folder (None: the one the teacher records).
        device: ``"cpu"``, ``"cuda"``, ... (None: cuda when available, else cpu).
        overwrite: allow a non-empty output_dir (the student's files in it are replaced; a checkpoint there of
            these settings and inputs is still resumed, not restarted).
        log_every: print a progress line every this many steps.
        save_every: checkpoint the run every this many steps (0: only on a stop request) to ``output_dir``;
            rerunning the same settings on the same teacher and data continues from it, to the same head as an
            uninterrupted run (the CPU's and the CUDA device's random state are restored).
    """

    teacher_dir: str
    output_dir: str
    scaling_pass_layers: int | None
    train_file: str
    eval_file: str | None = None
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    loss: str = "kl"
    temperature: float | None = None
    lm_weight: float = 0.0
    positions: str = "all"
    scored_weight: float = 0.0
    routing_weight: float = 0.0
    routing_key: str = "domain"
    init: str = "teacher"
    prefix_mean: bool | None = None
    chat: bool = False
    max_length: int = 512
    base_model: str | None = None
    device: str | None = None
    overwrite: bool = False
    log_every: int = 50
    save_every: int = 50

    def __post_init__(self) -> None:
        for name in ("teacher_dir", "output_dir", "train_file"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"{name} is required, got {value!r}: give a path")
            setattr(self, name, str(value))
        if Path(self.output_dir).is_file():
            raise ValueError(f"output_dir {self.output_dir!r} is a file, not a folder; give a folder")
        if self.scaling_pass_layers is not None:
            check_int("scaling_pass_layers", self.scaling_pass_layers, 1)
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0), ("max_length", 2),
                              ("log_every", 1), ("save_every", 0)):
            check_int(name, getattr(self, name), minimum)
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "lm_weight", "routing_weight", "scored_weight"):
            setattr(self, name, check_float(name, getattr(self, name)))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}: e.g. 1e-3")
        for name in ("weight_decay", "max_grad_norm", "lm_weight", "routing_weight", "scored_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature is not None and check_float("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0 (or None: the teacher's), got {self.temperature}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}: 'kl' for softmax heads, else 'mse'")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "unrouted" and self.routing_weight == 0:
            raise ValueError("positions='unrouted' leaves the routed positions to routing_weight, which is 0: set "
                             "routing_weight > 0 (--routing-weight) or positions='all'")
        if not isinstance(self.routing_key, str) or not self.routing_key:
            raise ValueError(f"routing_key must be the name of a record field, e.g. 'domain'; got {self.routing_key!r}")
        if not isinstance(self.init, (str, os.PathLike)) or (
                str(self.init) not in INITS and not (Path(self.init) / HEAD_FILE).is_file()):
            raise ValueError(f"init must be one of {INITS} or an X-LoRA directory holding {HEAD_FILE}, got "
                             f"{self.init!r}")
        self.init = str(self.init)
        for name in ("chat", "overwrite"):
            check_bool(name, getattr(self, name))
        if self.prefix_mean is not None:
            check_bool("prefix_mean", self.prefix_mean)
        if Path(self.output_dir).resolve() == Path(self.teacher_dir).resolve():
            raise ValueError(f"output_dir={self.output_dir!r} is the teacher's directory: the student would "
                             "overwrite the teacher's head; give another folder")

    def torch_device(self) -> Any:
        """``device`` as a ``torch.device`` (None: cuda when available, else cpu); refused naming the field when torch
        cannot parse it or has no CUDA for it."""
        import torch

        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}") \
                from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but this torch ({torch.__version__}) has no CUDA device; use "
                             "'cpu' (--device cpu) or leave it out")
        return device

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resume_settings(cfg: DistillConfig) -> dict[str, Any]:
    """The settings a checkpoint (or a finished report) must have been written with to be this run: all but how
    the run is watched, plus the sha256 of the teacher's files (:func:`teacher_files`) and of the data files."""
    digest = hashlib.sha256()
    inputs = [*teacher_files(Path(cfg.teacher_dir)), Path(cfg.train_file)]
    inputs += [Path(cfg.eval_file)] if cfg.eval_file else []
    inputs += [Path(cfg.init) / HEAD_FILE] if cfg.init not in INITS else []
    for path in inputs:
        digest.update(path.name.encode() + (hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"-"))
    return {**{k: v for k, v in cfg.to_dict().items() if k not in ("overwrite", "log_every", "save_every")},
            "inputs_sha256": digest.hexdigest()}


def teacher_files(teacher: Path) -> list[Path]:
    """The files that make the teacher: its folder's files but the run logs (``*.jsonl``, :data:`RUN_LOGS`, which a
    pipeline rewrites between phases) and, for an xlora directory, those of every expert folder it names."""
    def model_files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".jsonl" and p.name not in RUN_LOGS)

    if not teacher.is_dir():
        return []
    files = model_files(teacher)
    try:
        experts = json.loads((teacher / CONFIG_FILE).read_text()).get("experts", {})
    except (OSError, ValueError, AttributeError):
        experts = {}
    for path in experts.values() if isinstance(experts, dict) else ():
        folder = Path(path) if Path(path).is_absolute() else teacher / path
        files += model_files(folder) if folder.is_dir() else []
    return files


def finished_report(cfg: DistillConfig) -> dict[str, Any] | None:
    """The report of a *complete* run in ``cfg.output_dir`` with these settings and inputs (None if there is none):
    a caller that would only redo it (a pipeline rerun) can keep it."""
    path = Path(cfg.output_dir) / REPORT_FILE
    try:
        report = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    ok = report is not None and report.get("resume_settings") == resume_settings(cfg)
    return report if ok and (Path(cfg.output_dir) / HEAD_FILE).is_file() else None
