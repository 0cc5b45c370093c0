"""Training the scaling head (and optionally the experts) with Hugging Face Accelerate.

The same code runs on one CPU, one GPU or many processes (``accelerate launch`` / ``torchrun``,
DDP). Batches are a deterministic function of ``(seed, epoch)``: a global micro-batch of
``per_device_batch_size · processes`` examples is cut into one slice per process, and the loss of
an optimizer step is the token-summed cross-entropy divided by the number of loss tokens of the
whole step on all processes — so N processes give the same update as one process with the same
global batch. Randomness (dropout) is re-seeded from ``(seed, step, rank)`` at every step, which
makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xlora._io import atomic_write_text
from xlora.generation import pad_token_id
from xlora.model import XLoraModel
from xlora.saving import load_local
from xlora.train.checkpoints import (
    CHECKPOINTS,
    newest_valid_checkpoint,
    optimizer_from_tensors,
    save_checkpoint,
)
from xlora.train.config import TrainConfig
from xlora.train.data import TokenizedExample, batch_order, build_dataset, collate

MARKER = "train_config.json"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what to do)."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    interrupted: bool = False


def prepare_output_dir(cfg: TrainConfig) -> None:
    """Refuse to clobber: an existing non-empty directory needs ``resume`` (ours) or ``overwrite``."""
    out = Path(cfg.output_dir)
    if not out.exists() or not any(out.iterdir()):
        if cfg.resume:
            raise TrainingError(f"resume=True but {str(out)!r} holds no run to resume; drop --resume")
        return
    ours = (out / MARKER).is_file()
    if cfg.resume:
        if not ours:
            raise TrainingError(f"resume=True but {str(out)!r} is not an xlora training directory (no {MARKER})")
        return
    if not cfg.overwrite:
        what = "holds a previous run" if ours else "exists and is not an xlora training directory"
        raise TrainingError(f"output_dir {str(out)!r} {what}; pass --resume to continue it or --overwrite to start over")
    # overwrite: remove only what a run of ours writes; never the user's other files
    for name in (CHECKPOINTS, METRICS, MARKER, "xlora_config.json", "xlora_head.safetensors", "experts"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scalings_regularizer(scalings: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``balance``: ``E·Σ_e p̄_e²`` of the token-mean scalings; ``entropy``: mean per-token entropy."""
    s = scalings.float().mean(dim=2)  # [b, t, E], layers averaged
    m = mask.to(s.dtype).unsqueeze(-1)  # [b, t, 1]
    if kind == "balance":
        p = (s * m).sum((0, 1)) / m.sum().clamp_min(1)
        return s.shape[-1] * (p * p).sum()
    ent = -(s.clamp_min(1e-9).log() * s).sum(-1, keepdim=True)
    return (ent * m).sum() / m.sum().clamp_min(1)


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labels != -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


class _StopFlag:
    """Turns SIGINT / SIGTERM into a flag checked between steps (a checkpoint is written, then we exit)."""

    def __init__(self) -> None:
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def evaluate(model: Any, examples: list[TokenizedExample], batch_size: int, pad_id: int, accelerator: Any) -> float:
    """Mean next-token loss over all loss tokens of ``examples`` (sharded over processes)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = examples[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(accelerator.device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total[0] += _token_loss_sum(out.logits, batch["labels"]).double()
            total[1] += _loss_tokens(batch)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp_min(1))


def train(cfg: TrainConfig) -> TrainResult:
    """Train the X-LoRA head on ``cfg.train_file``; writes the model, metrics and checkpoints to ``cfg.output_dir``.

    Raises:
        TrainingError: bad output directory, or a non-finite loss (the last good checkpoint is kept).
        ValueError / FileNotFoundError: bad data or configuration (the message names the culprit).
    """
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Without a GPU/XPU, Accelerate only forms a multi-process (gloo) group when told it is on CPU.
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    fix = "set base_model (--base-model) to a local model folder"
    tokenizer = load_local(AutoTokenizer, cfg.base_model, "the base model's tokenizer", fix)
    _forget_accelerator_settings()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not has_accel)
    out = Path(cfg.output_dir)
    main = accelerator.is_main_process
    if main:
        prepare_output_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MARKER, json.dumps(cfg.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.seed)
    pad_id = pad_token_id(tokenizer)
    train_set, stats = build_dataset(cfg.train_file, tokenizer, cfg.max_length, packing=cfg.packing)
    eval_set = build_dataset(cfg.eval_file, tokenizer, cfg.max_length)[0] if cfg.eval_file else None

    base = load_local(AutoModelForCausalLM, cfg.base_model, "the base model", fix)
    resume_from = newest_valid_checkpoint(out) if cfg.resume else None
    if resume_from is not None:
        model = XLoraModel.from_pretrained(resume_from[0], base_model=base)
    else:
        model = XLoraModel(base, cfg.xlora)
    model.to(accelerator.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    start = 0
    if resume_from is not None:
        path, state, optim_tensors = resume_from
        optimizer_from_tensors(optimizer, optim_tensors, state["param_groups"])
        start = state["step"]
        if main:
            print(f"resuming from {path} (step {start})")
    ddp_model, optimizer = accelerator.prepare(model, optimizer)

    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.per_device_batch_size * world
    lengths = [len(e.input_ids) for e in train_set]
    micro_per_epoch = math.ceil(len(train_set) / micro)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    if main:
        print(f"{stats.num_examples} training examples ({stats.num_truncated} truncated to {cfg.max_length} tokens), "
              f"{world} process(es), global batch {micro * cfg.gradient_accumulation_steps}, {total} steps")

    def micro_batches(step: int) -> list[list[int]]:
        epoch, k = divmod(step, steps_per_epoch)
        order = batch_order(lengths, micro, cfg.seed, epoch, cfg.group_by_length)
        return order[k * cfg.gradient_accumulation_steps:(k + 1) * cfg.gradient_accumulation_steps]

    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    tb = _tensorboard(out) if main else None
    last_loss, eval_loss, interrupted = float("nan"), None, False
    t0, tokens_seen = time.perf_counter(), 0
    with _StopFlag() as stop:
        step = start
        while step < total:
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
            # every process runs every micro-batch (DDP all-reduces in each backward); a process whose
            # slice of a short last batch is empty runs one example with weight 0
            slices = [_rank_slice(idx, rank, world) for idx in micro_batches(step)]
            batches = [{k: v.to(accelerator.device) for k, v in collate([train_set[i] for i in (g or [0])],
                                                                         pad_id).items()} for g in slices]
            weights = [1.0 if g else 0.0 for g in slices]
            n_tokens = torch.tensor([sum(_loss_tokens(b) * w for b, w in zip(batches, weights))],
                                    device=accelerator.device, dtype=torch.float64)
            n_global = float(accelerator.reduce(n_tokens, reduction="sum").item())
            loss_sum = torch.zeros((), device=accelerator.device)
            for i, (batch, weight) in enumerate(zip(batches, weights)):
                ctx = accelerator.no_sync(ddp_model) if i < len(batches) - 1 else nullcontext()
                with ctx, accelerator.autocast():
                    o = ddp_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False)
                    ce = _token_loss_sum(o.logits, batch["labels"]) * weight
                    loss = ce * world / max(n_global, 1.0)
                    if cfg.regularizer != "none" and cfg.regularizer_weight > 0:
                        reg = scalings_regularizer(o.scalings, batch["attention_mask"], cfg.regularizer)
                        loss = loss + cfg.regularizer_weight * reg / len(batches)
                    if not torch.isfinite(loss):
                        ckpts = sorted((out / CHECKPOINTS).glob("step-*"))
                        last = str(ckpts[-1]) if ckpts else "none yet"
                        raise TrainingError(
                            f"the loss became {loss.item()} at step {step + 1}; stopping. The last good checkpoint "
                            f"is {last}. Lower --learning-rate, enable --max-grad-norm, or check the data."
                        )
                    accelerator.backward(loss)
                loss_sum += ce.detach()
                tokens_seen += int(batch["attention_mask"].sum()) * int(weight)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            lr = cfg.learning_rate * lr_factor(step, cfg.warmup_steps, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = float(accelerator.reduce(loss_sum.reshape(1), reduction="sum").item()) / max(n_global, 1.0)
            elapsed = time.perf_counter() - t0
            if main:
                tps = tokens_seen * world / max(elapsed, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                if step % cfg.log_every == 0 or step == total:
                    rec = {"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tps, "elapsed_s": elapsed}
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    _log(out, tb, rec)
            do_save = step % cfg.save_every == 0 or step == total or stop.raised is not None
            do_eval = eval_set is not None and (
                step == total or (step % cfg.eval_every == 0 if cfg.eval_every else step % cfg.save_every == 0))
            if do_eval:
                eval_loss = evaluate(ddp_model, eval_set, cfg.per_device_batch_size, pad_id, accelerator)
                if main:
                    _log(out, tb, {"step": step, "eval_loss": eval_loss})
            if do_save:
                bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
                if bad:
                    raise TrainingError(f"parameters {bad[:3]} became non-finite at step {step}; not saving. "
                                        "Lower --learning-rate or enable --max-grad-norm.")
                if main:
                    save_checkpoint(out, step, model, optimizer, {"train_loss": last_loss, "eval_loss": eval_loss},
                                    cfg.keep_checkpoints)
                accelerator.wait_for_everyone()
            if stop.raised is not None:
                interrupted = True
                if main:
                    print(f"\nstopped by signal {stop.raised} at step {step}; checkpoint saved, "
                          f"continue with --resume")
                break
    if bar is not None:
        bar.close()
    if main and not interrupted:
        model.save_pretrained(out, bundle=cfg.bundle)
        tokenizer.save_pretrained(str(out))
    if tb is not None:
        tb.close()
    accelerator.wait_for_everyone()
    return TrainResult(out, step, last_loss, eval_loss, interrupted)


def _rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global micro-batch (equal shares; a short batch is split evenly)."""
    share = math.ceil(len(indices) / world)
    return indices[rank * share:(rank + 1) * share]


def _forget_accelerator_settings() -> None:
    """Let a second ``train()`` in the same process use other settings (e.g. ``mixed_precision``).

    Accelerate keeps its settings in a process-wide singleton and refuses a different
    ``mixed_precision`` once set; the settings are dropped here, the process group (``PartialState``,
    set up by ``torchrun``/``accelerate launch``) is kept.
    """
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset(reset_partial_state=False)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log(out: Path, tb: Any, record: dict[str, Any]) -> None:
    with open(out / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if tb is not None:
        for k, v in record.items():
            if k != "step":
                tb.add_scalar(k, v, record["step"])

