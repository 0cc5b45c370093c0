"""Training the scaling head (and optionally the experts) with Hugging Face Accelerate.

The same code runs on one CPU, one GPU or many processes (``accelerate launch`` / ``torchrun``,
DDP). Batches are a deterministic function of ``(seed, epoch)``: a global micro-batch of
``per_device_batch_size · processes`` examples is cut into one slice per process, and the loss of
an optimizer step is the token-summed cross-entropy divided by the number of loss tokens of the
whole step on all processes — so N processes give the same update as one process with the same
global batch. Randomness (dropout) is re-seeded from ``(seed, step, rank)`` at every step, which
makes a resumed run identical to an uninterrupted one.

:func:`train` is a loop over four functions: :func:`~xlora.train.setup.setup` (load and check
everything, then prepare the output directory), :func:`train_step` (one optimizer step),
:func:`evaluate` and :func:`save_training_checkpoint`; :func:`finish` writes the final model.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlora.train.checkpoints import (
    METRICS,
    TENSORBOARD,
    checkpoint_state,
    list_checkpoints,
    resume_refusal,
    save_checkpoint,
)
from xlora.train.config import TrainConfig
from xlora.train.data import TokenizedExample, batch_order, collate
from xlora.train.fsdp import sync_gradients
from xlora.train.losses import loss_tokens, scalings_regularizer, step_batch, token_loss_sum
from xlora.train.routing import routed_examples, routing_cross_entropy
from xlora.train.setup import Run, TrainingError, setup

__all__ = ["TrainResult", "TrainingError", "evaluate", "finish", "lr_factor", "save_training_checkpoint",
           "scalings_regularizer", "train", "train_step"]


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    interrupted: bool = False
    finished_before: bool = False  # resumed a run whose schedule had already ended: nothing was trained


@dataclass
class StepResult:
    """What one optimizer step did: mean loss per loss token (all processes), learning rate, gradient norm
    before clipping (``None`` without clipping), the tokens this process fed through the model and the mean
    routing cross-entropy of the step's examples with a target (``None``: routing off, or no such example)."""

    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    routing: float | None = None


def train(cfg: TrainConfig) -> TrainResult:
    """Train the X-LoRA head on ``cfg.train_file``; writes the model, metrics and checkpoints to ``cfg.output_dir``.

    Raises:
        TrainingError: bad output directory or setting, or a non-finite loss (the last good checkpoint is kept).
        ValueError / FileNotFoundError: bad data or configuration (the message names the culprit). Nothing is
            written to ``output_dir`` when setup fails. Resuming (``resume``) with options other than the
            schedule's (:data:`~xlora.train.config.RESUMABLE_CHANGES`) is a TrainingError and writes nothing.
    """
    refused = resume_refusal(cfg)
    if refused:
        raise TrainingError(refused)
    run = setup(cfg)
    if run.start >= run.total:
        return _finished_before(run)
    if run.main:
        world = run.accelerator.num_processes
        print(f"{run.stats.num_examples} training examples ({run.stats.num_truncated} truncated to "
              f"{cfg.max_length} tokens), {world} process(es), global batch "
              f"{cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps}, {run.total} steps")
    step, result, eval_loss, interrupted = run.start, StepResult(float("nan"), 0.0, None, 0), None, False
    with _StopFlag() as stop, _Metrics(run) as metrics:
        while step < run.total and not interrupted:
            result = train_step(run, step)
            step += 1
            metrics.step(step, result)
            interrupted = _any_process(run, stop.raised is not None)  # one decision, the same on every process
            if _eval_due(run, step):
                eval_loss = evaluate(run.ddp_model, run.eval_set, cfg.per_device_batch_size, run.pad_id,
                                     run.accelerator, run.precision.autocast)
                metrics.log({"step": step, "eval_loss": eval_loss})
            if step % cfg.save_every == 0 or step == run.total or interrupted:
                save_training_checkpoint(run, step, {"train_loss": result.loss, "eval_loss": eval_loss})
    if interrupted and run.main:
        print(f"\nstopped by a signal at step {step}; checkpoint saved, continue with --resume")
    finish(run, interrupted)
    return TrainResult(run.out, step, result.loss, eval_loss, interrupted)


def _finished_before(run: Run) -> TrainResult:
    """Resuming a run whose checkpoint is at or past the end of the schedule: write the final model (a kill may
    have come between the last checkpoint and the final save) and say so; nothing is trained."""
    finish(run, interrupted=False)
    state = checkpoint_state(run.out, run.start)
    if run.main:
        print(f"{run.out} already finished: its checkpoint is at step {run.start} and this schedule ends at step "
              f"{run.total}; nothing to train (raise --max-steps to train it further)")
    return TrainResult(run.out, run.start, float(state.get("train_loss", math.nan)), state.get("eval_loss"),
                       finished_before=True)


def train_step(run: Run, step: int) -> StepResult:
    """Optimizer step ``step`` (0-based): forward and backward over its micro-batches, clip, update."""
    acc, world = run.accelerator, run.accelerator.num_processes
    torch.manual_seed(run.cfg.seed * 1_000_003 + step * 1009 + acc.process_index)
    batches = [(step_batch(b, run.cfg.routing_tokens, run.cfg.lm_examples), w) for b, w in micro_batches(run, step)]
    mine = torch.tensor([sum(loss_tokens(b) * w for b, w in batches), sum(_routed(b) * w for b, w in batches)],
                        device=acc.device, dtype=torch.float64)
    counts = acc.reduce(mine, reduction="sum")  # loss tokens and routed examples of the step, all processes
    n_global, n_routed = max(float(counts[0].item()), 1.0), max(float(counts[1].item()), 1.0)
    loss_sum, routing_sum, tokens = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device), 0
    for i, (batch, weight) in enumerate(batches):
        # DDP all-reduces gradients in the last micro-batch's backward only
        with acc.no_sync(run.ddp_model) if i < len(batches) - 1 else nullcontext():
            with run.precision.autocast():
                out = run.ddp_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False)
                ce = token_loss_sum(out.logits, batch["labels"]) * weight
                loss = ce * world / n_global
                if run.cfg.regularizer != "none" and run.cfg.regularizer_weight > 0:
                    reg = scalings_regularizer(out.scalings, batch["attention_mask"], run.cfg.regularizer)
                    loss = loss + run.cfg.regularizer_weight * reg / len(batches)
                if "routing_target" in batch:  # mean over the step's routed examples, like the token loss
                    routed = routing_cross_entropy(out.scalings, batch["routing_mask"], batch["routing_target"],
                                                   reduction="sum") * weight
                    loss = loss + run.cfg.routing_weight * routed * world / n_routed
                    routing_sum += routed.detach()
            if not torch.isfinite(loss):
                last = list_checkpoints(run.out)
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1}; stopping. The last good checkpoint is "
                    f"{last[-1] if last else 'none yet'}. Lower --learning-rate, enable --max-grad-norm, or check "
                    "the data.")
            scaler = run.precision.scaler
            acc.backward(scaler.scale(loss) if scaler is not None else loss)
        loss_sum += ce.detach()
        tokens += int(batch["attention_mask"].sum()) * int(weight)
    grad_norm, lr = _update(run, step)
    loss = float(acc.reduce(loss_sum.reshape(1), reduction="sum").item()) / n_global
    routing = None
    if run.cfg.routing_weight > 0 and counts[1] > 0:
        routing = float(acc.reduce(routing_sum.reshape(1), reduction="sum").item()) / n_routed
    return StepResult(loss, lr, grad_norm, tokens, routing)


def _routed(batch: dict[str, torch.Tensor]) -> int:
    """The examples of ``batch`` that take the routing loss (0 when routing is off)."""
    return int(routed_examples(batch["routing_target"])) if "routing_target" in batch else 0


def _any_process(run: Run, flag: bool) -> bool:
    flags = torch.tensor([float(flag)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flags, reduction="sum").item() > 0)


def micro_batches(run: Run, step: int) -> list[tuple[dict[str, torch.Tensor], float]]:
    """This process's ``(batch, weight)`` for each micro-batch of ``step``.

    Every process runs every micro-batch (DDP all-reduces in each synchronised backward); a process
    whose slice of a short last batch is empty runs one example with weight 0.
    """
    cfg, acc = run.cfg, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    experts = cfg.xlora.expert_names if cfg.routing_weight > 0 else None  # the routing targets travel with the batch
    epoch, pos = divmod(step, run.steps_per_epoch)
    lengths = [len(e.input_ids) for e in run.train_set]
    order = batch_order(lengths, cfg.per_device_batch_size * world, cfg.seed, epoch, cfg.group_by_length)
    out = []
    for indices in order[pos * cfg.gradient_accumulation_steps:(pos + 1) * cfg.gradient_accumulation_steps]:
        share = math.ceil(len(indices) / world)  # equal shares; a short batch is split evenly
        mine = indices[rank * share:(rank + 1) * share]
        batch = collate([run.train_set[i] for i in (mine or [0])], run.pad_id, experts=experts)
        out.append(({k: v.to(acc.device) for k, v in batch.items()}, 1.0 if mine else 0.0))
    return out


def _update(run: Run, step: int) -> tuple[float | None, float]:
    """Clip, set the learning rate of ``step`` and take the optimizer step; ``(grad_norm, lr)``."""
    cfg, scaler, optimizer = run.cfg, run.precision.scaler, run.optimizer
    if run.sharded:  # FSDP leaves the gradients of the whole (trainable) parameters to us
        sync_gradients(run.params, run.accelerator.num_processes)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    grad_norm = None
    if cfg.max_grad_norm > 0:
        grad_norm = float(run.accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm))
    lr = cfg.learning_rate * lr_factor(step, cfg.warmup_steps, run.total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def evaluate(model: Any, examples: list[TokenizedExample], batch_size: int, pad_id: int, accelerator: Any,
             autocast: Any = nullcontext) -> float:
    """Mean next-token loss over all loss tokens of ``examples`` (sharded over processes)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = examples[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(accelerator.device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
            with autocast():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total[0] += token_loss_sum(out.logits, batch["labels"]).double()
            total[1] += loss_tokens(batch)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp_min(1))


def _eval_due(run: Run, step: int) -> bool:
    if run.eval_set is None:
        return False
    return step == run.total or step % (run.cfg.eval_every or run.cfg.save_every) == 0


def save_training_checkpoint(run: Run, step: int, state: dict[str, Any]) -> None:
    """Refuse non-finite parameters, then write ``checkpoints/step-N`` (main process) and prune old ones."""
    bad = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"parameters {bad[:3]} became non-finite at step {step}; not saving. "
                            "Lower --learning-rate or enable --max-grad-norm.")
    if run.precision.scaler is not None:
        state = {**state, "grad_scaler": run.precision.scaler.state_dict()}
    if run.main:
        save_checkpoint(run.out, step, run.model, run.optimizer, state, run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def finish(run: Run, interrupted: bool) -> None:
    """Write the final model and tokenizer to ``output_dir`` (not after an interruption: resume instead)."""
    if run.main and not interrupted:
        run.model.save_pretrained(run.out, bundle=run.cfg.bundle)
        run.tokenizer.save_pretrained(str(run.out))
    run.accelerator.wait_for_everyone()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


class _Metrics:
    """Progress bar, ``metrics.jsonl`` and TensorBoard (if installed), on the main process only."""

    def __init__(self, run: Run) -> None:
        self.run, self.bar, self.tb = run, None, None
        self.t0, self.tokens = time.perf_counter(), 0

    def __enter__(self) -> _Metrics:
        if self.run.main and self.run.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.run.total, initial=self.run.start, desc="train", dynamic_ncols=True)
        if self.run.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(self.run.out / TENSORBOARD))
        return self

    def step(self, step: int, result: StepResult) -> None:
        self.tokens += result.tokens
        if not self.run.main:
            return
        elapsed = time.perf_counter() - self.t0
        tps = self.tokens * self.run.accelerator.num_processes / max(elapsed, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{tps:.0f}")
        if step % self.run.cfg.log_every == 0 or step == self.run.total:
            record = {"step": step, "loss": result.loss, "lr": result.lr, "tokens_per_s": tps, "elapsed_s": elapsed}
            if result.grad_norm is not None:
                record["grad_norm"] = result.grad_norm
            if result.routing is not None:
                record["routing_loss"] = result.routing
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        if not self.run.main:
            return
        with open(self.run.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
