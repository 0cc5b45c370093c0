"""Setting up a training run: everything is loaded and checked before anything is written.

:func:`setup` checks the output directory (without touching it), configures Accelerate and the
mixed precision, loads the tokenizer, the data, the base model with its experts and the checkpoint
to resume; only then does the main process clear (``overwrite``) or tidy (stale temporaries of a
killed run) the output directory and write the run marker. Bad data, a missing expert or a refused
setting therefore leave the directory as they found it, and the same command works once fixed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlora import XLoraConfig, XLoraModel
from xlora.files import atomic_write_text
from xlora.generation import pad_token_id
from xlora.saving import CONFIG_FILE, EXPERTS_DIR, HEAD_FILE, base_load_kwargs, load_local
from xlora.train.checkpoints import (
    CHECKPOINTS,
    MARKER,
    METRICS,
    TENSORBOARD,
    clean_stale,
    newest_valid_checkpoint,
    optimizer_from_tensors,
)
from xlora.train.config import TrainConfig
from xlora.train.data import DatasetStats, TokenizedExample, build_dataset
from xlora.train.errors import TrainingError
from xlora.train.fsdp import BUNDLE_REFUSED, fsdp_requested, shard
from xlora.train.records import require_file
from xlora.train.routing import check_routing_targets

_FIX_BASE = "set base_model (--base-model) to a local model folder"
Resumed = tuple[Path, dict[str, Any], dict[str, torch.Tensor]]  # (checkpoint, trainer state, optimizer tensors)


@dataclass
class Precision:
    """``TrainConfig.mixed_precision`` applied with ``torch.autocast`` (and a gradient scaler for fp16)."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: Any = None  # a GradScaler for fp16, else None

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()


@dataclass
class Run:
    """Everything a training run uses, built by :func:`setup`."""

    cfg: TrainConfig
    accelerator: Any
    precision: Precision
    model: XLoraModel  # unwrapped: saving and parameter checks
    ddp_model: Any  # what forward and backward go through (the DDP/FSDP wrapper, or the model itself)
    optimizer: Any
    params: list[torch.nn.Parameter]
    tokenizer: Any
    train_set: list[TokenizedExample]
    eval_set: list[TokenizedExample] | None
    stats: DatasetStats
    pad_id: int
    start: int  # the first step to run: 0, or the resumed checkpoint's step
    total: int
    steps_per_epoch: int
    sharded: bool = False  # FSDP: the trainable parameters' gradients are averaged by xlora.train.fsdp

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: TrainConfig) -> Run:
    """Load and check everything for ``cfg``, then prepare the output directory (see the module doc)."""
    from transformers import AutoTokenizer

    marker = json.dumps(cfg.to_dict(), indent=2) + "\n"  # the options as given, before any model exists
    check_output_dir(cfg)
    accelerator = make_accelerator(cfg.mixed_precision)
    sharded = fsdp_requested(accelerator)
    if sharded and cfg.bundle:  # refused before any model is loaded
        raise TrainingError(BUNDLE_REFUSED)
    precision = make_precision(cfg.mixed_precision, accelerator)
    require_file(cfg.train_file, "train_file (--train-file)")
    if cfg.eval_file:
        require_file(cfg.eval_file, "eval_file (--eval-file)")
    tokenizer = load_local(AutoTokenizer, cfg.base_model, "the base model's tokenizer", _FIX_BASE)
    torch.manual_seed(cfg.seed)
    routing_key = cfg.routing_key if cfg.routing_weight > 0 else None
    train_set, stats = build_dataset(cfg.train_file, tokenizer, cfg.max_length, packing=cfg.packing, chat=cfg.chat,
                                     routing_key=routing_key)
    unrouted = 0 if routing_key is None else check_routing_targets(
        [e.target for e in train_set], cfg.xlora.expert_names, routing_key, cfg.routing_weight)
    eval_set = build_dataset(cfg.eval_file, tokenizer, cfg.max_length, chat=cfg.chat)[0] if cfg.eval_file else None
    resumed = newest_valid_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    model = build_model(cfg, resumed).to(accelerator.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, resumed, precision)
    if sharded:  # FSDP: the frozen weights in shards, the trainable ones whole (xlora.train.fsdp)
        ddp_model = shard(model)
    else:
        ddp_model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.wait_for_everyone()  # every process has checked its inputs: now write
    start = resumed[1]["step"] if resumed else 0
    if accelerator.is_main_process:
        start_output_dir(cfg, marker, start)
        if resumed:
            print(f"resuming from {resumed[0]} (step {start})")
        if routing_key is not None:
            print(f"routing supervision (weight {cfg.routing_weight}): {unrouted} of {len(train_set)} training "
                  f"examples name no expert in {routing_key!r} or 'experts' and take no routing loss")
    accelerator.wait_for_everyone()
    steps_per_epoch, total = schedule(cfg, len(train_set), accelerator.num_processes)
    return Run(cfg, accelerator, precision, model, ddp_model, optimizer, params, tokenizer, train_set, eval_set,
               stats, pad_token_id(tokenizer), start, total, steps_per_epoch, sharded)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to clobber (nothing is written here): a non-empty directory needs ``resume`` (ours) or ``overwrite``."""
    out = Path(cfg.output_dir)
    if not out.exists() or not any(out.iterdir()):
        if cfg.resume:
            raise TrainingError(f"resume=True but {str(out)!r} holds no run to resume; drop --resume")
        return
    ours = (out / MARKER).is_file()
    if cfg.resume and not ours:
        raise TrainingError(f"resume=True but {str(out)!r} is not an xlora training directory (no {MARKER})")
    if not cfg.resume and not cfg.overwrite:
        what = "holds a previous run" if ours else "exists and is not an xlora training directory"
        raise TrainingError(f"output_dir {str(out)!r} {what}; pass --resume to continue it or --overwrite to start over")


def start_output_dir(cfg: TrainConfig, marker: str, start: int) -> None:
    """Clear a previous run (``overwrite``: only what a run of ours writes), remove a killed run's leftovers,
    keep the metrics of the steps being resumed, and write the marker."""
    out = Path(cfg.output_dir)
    if cfg.overwrite:
        for name in (CHECKPOINTS, METRICS, TENSORBOARD, MARKER, CONFIG_FILE, HEAD_FILE, EXPERTS_DIR):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    trim_metrics(out / METRICS, start)
    atomic_write_text(out / MARKER, marker)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the complete records of steps ``<= step`` (a killed run may have cut a line, or logged steps that
    resuming from ``step`` will run again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def make_accelerator(mixed_precision: str) -> Any:
    """An ``Accelerator`` that is the same for every run of the process (see :func:`make_precision`).

    Accelerate keeps one process-wide configuration that cannot change once set, so the trainer
    always asks for ``mixed_precision="no"`` and applies ``TrainConfig.mixed_precision`` itself:
    ``train()`` may run any number of times in one process, with different precisions.
    """
    from accelerate import Accelerator

    # Without a GPU/XPU, Accelerate only forms a multi-process (gloo) group when told it is on CPU.
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != mixed_precision:
        warnings.warn(f"mixed precision {launcher!r} from the launcher (accelerate launch --mixed_precision) is not "
                      f"used; this run uses mixed_precision={mixed_precision!r}: pass --mixed-precision {launcher} "
                      "to xlora train to change it", stacklevel=3)
    try:
        return Accelerator(mixed_precision="no", cpu=not has_accel)
    except ValueError as err:
        raise TrainingError(
            f"Accelerate refused the trainer's setup (mixed_precision='no', cpu={not has_accel}): {err} Accelerate's "
            "settings are process-wide: if other code in this process created an Accelerator, create it with "
            "mixed_precision='no' (xlora applies TrainConfig.mixed_precision itself), or run xlora train in its "
            "own process") from None


def make_precision(mixed_precision: str, accelerator: Any) -> Precision:
    """Autocast dtype and gradient scaler for ``mixed_precision`` on ``accelerator.device``."""
    from accelerate.utils import DistributedType, get_grad_scaler

    device_type = accelerator.device.type
    if mixed_precision == "no":
        return Precision(device_type)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError(f"mixed_precision={mixed_precision!r} is not applied under DeepSpeed, whose own config "
                            "sets the precision: enable its bf16/fp16 section and pass --mixed-precision no")
    if mixed_precision == "bf16":
        return Precision(device_type, torch.bfloat16)
    if device_type == "cpu":
        raise TrainingError("mixed_precision='fp16' needs a GPU, and this run is on the CPU: pass "
                            "--mixed-precision bf16 (CPUs support it) or --mixed-precision no")
    return Precision(device_type, torch.float16, get_grad_scaler(accelerator.distributed_type))


def build_model(cfg: TrainConfig, resumed: Resumed | None) -> XLoraModel:
    """The base model with the experts injected and a fresh head, or the head of the checkpoint to resume."""
    from transformers import AutoModelForCausalLM

    base = load_local(AutoModelForCausalLM, cfg.base_model, "the base model", _FIX_BASE,
                      **base_load_kwargs(cfg.dtype, cfg.load_in_8bit, cfg.load_in_4bit))
    xcfg = XLoraConfig.from_dict(cfg.xlora.to_dict())  # a copy: cfg stays as given
    if xcfg.use_trainable_adapters and xcfg.lora_dtype is None:
        xcfg.lora_dtype = "float32"  # trained experts keep float32 weights for the optimiser, whatever the base
    model = XLoraModel.from_pretrained(resumed[0], base_model=base) if resumed is not None else XLoraModel(base, xcfg)
    model.head.float()  # the optimiser sees float32 weights even over a half-precision base (as PEFT's adapters)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], resumed: Resumed | None,
                   precision: Precision) -> torch.optim.Optimizer:
    """AdamW over ``params``, with the checkpoint's state (and fp16 loss scale) when resuming."""
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if resumed is not None:
        _, state, tensors = resumed
        optimizer_from_tensors(optimizer, tensors, state["param_groups"])
        if precision.scaler is not None and state.get("grad_scaler"):
            precision.scaler.load_state_dict(state["grad_scaler"])
    return optimizer


def schedule(cfg: TrainConfig, num_examples: int, world: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` for a global micro-batch of ``per_device_batch_size · world``."""
    micro_per_epoch = math.ceil(num_examples / (cfg.per_device_batch_size * world))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    return steps_per_epoch, cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
