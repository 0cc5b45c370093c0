"""Dynamic batching for serving: one worker thread owns the model and decodes requests together.

Requests that arrive within ``batch_window_ms`` of the first one (up to ``max_batch``) form a
batch: their prompts are left-padded, prefilled once with an :class:`~xlora.generation.XLoraCache`
and decoded step by step, each row with its own sampling parameters and ``torch.Generator``.
Finished or cancelled rows leave the batch at once (``cache.batch_select_indices`` on both
caches, and the same rows of the attention mask and positions), so they stop costing compute.
Requests arriving while a batch runs join it at the next step (continuous batching): their prompts
are prefilled on their own and their caches appended to the running ones, left-padded with masked
zeros, so a row only ever attends to its own tokens. Models with sliding-window cache layers cannot
merge caches; there, new requests wait for the next batch.

Shutdown: :meth:`Batcher.begin_shutdown` stops taking requests and gives the running and queued
ones ``grace_s`` seconds; then the worker ends each of them itself with a ``"cancelled"``
:class:`FinishEvent` carrying the reason, which the server answers as an OpenAI error (an SSE
error event, or a JSON 503), so no client is left with a cut connection.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xlora.generation import pad_token_id
from xlora.serve.jobs import Event, FinishEvent, Job, RowState, RunningBatch, TokenEvent
from xlora.serve.sampling import SamplingParams

__all__ = ["Batcher", "BatcherConfig", "Event", "FinishEvent", "Job", "QueueFull", "SamplingParams",
           "ShuttingDown", "TokenEvent"]


@dataclass
class BatcherConfig:
    """Knobs of the batching worker.

    Args:
        max_batch: the most requests decoded together.
        batch_window_ms: after the first request of a batch arrives, wait this long for others.
        max_queue: the most requests waiting for a batch; beyond it :meth:`Batcher.submit` raises
            :class:`QueueFull` (HTTP 429).
    """

    max_batch: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if not 0.0 <= self.batch_window_ms <= 10_000:
            raise ValueError(f"batch_window_ms must be in [0, 10000], got {self.batch_window_ms!r}; 5-20 is typical")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue``."""


class ShuttingDown(RuntimeError):
    """The batcher accepts no new requests."""


NOT_STARTED = "the server shut down before this request started; retry it on another instance"


class Batcher:
    """Owns ``model`` on one worker thread and serves submitted jobs in dynamic batches.

    Args:
        model: an :class:`~xlora.model.XLoraModel`, put in eval mode (used only by the worker).
        tokenizer: its tokenizer (decoding runs under :attr:`tokenizer_lock`; callers that
            encode on other threads should hold it too).
        config: batching knobs.
    """

    def __init__(self, model: Any, tokenizer: Any, config: BatcherConfig | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or BatcherConfig()
        self.tokenizer_lock = threading.Lock()
        self.pad_id = pad_token_id(tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0  # jobs submitted and not yet in a batch
        self._lock = threading.Lock()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # time.monotonic() at which running rows are ended
        self._grace_s = 0.0
        self._stopping = False  # the shutdown sentinel was taken: finish the current work, then stop
        # statistics, read by the server's /metrics
        self.active_rows = 0
        self.generated_tokens = 0
        self.batch_sizes: Counter[int] = Counter()  # rows per prefill -> number of prefills
        self.joined_rows = 0  # rows that joined a running batch
        self.finished = dict.fromkeys(("stop", "length", "cancelled", "error"), 0)

    @property
    def queue_length(self) -> int:
        """Jobs waiting for a batch."""
        return self._pending

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xlora-batcher", daemon=True)
            self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Job:
        """Queue a request; raises :class:`ShuttingDown` or :class:`QueueFull` instead of queueing."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the prompt must have at least one token")
        job = Job(list(prompt_ids), params, sink)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._pending >= self.config.max_queue:
                raise QueueFull(f"{self._pending} requests are already waiting (max_queue={self.config.max_queue})")
            self._pending += 1
            self._queue.put(job)
        return job

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting jobs; queued and running ones go on for ``grace_s`` seconds (``None``: until
        they finish), then the worker ends them at its next step with a ``"cancelled"`` finish whose
        ``error`` says why. A later call can only bring the deadline closer."""
        with self._lock:
            self._accepting = False
            if grace_s is not None:
                deadline = time.monotonic() + max(0.0, grace_s)
                if self._deadline is None or deadline < self._deadline:
                    self._deadline, self._grace_s = deadline, grace_s

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, give running and queued jobs up to ``timeout`` s (or the earlier deadline of
        :meth:`begin_shutdown`), end the rest, and stop the worker."""
        self.begin_shutdown(timeout)
        self._queue.put(None)
        if self._thread is not None:
            left = (self._deadline or 0.0) - time.monotonic()  # the deadline is set: begin_shutdown(timeout)
            self._thread.join(max(0.0, left) + 5.0)  # + time for the step running at the deadline
        for job in self._drain():  # never started: finish them so no client waits forever
            self._finish(job, "cancelled", 0, NOT_STARTED)

    def _expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _shutdown_error(self) -> str:
        return (f"the server is shutting down and this request did not finish within its shutdown timeout "
                f"of {self._grace_s:g} s; retry it on another instance")

    # ------------------------------------------------------------------ worker
    def _drain(self) -> list[Job]:
        jobs: list[Job | None] = []
        with contextlib.suppress(queue.Empty):
            while True:
                jobs.append(self._take(block=False))
        return [job for job in jobs if job is not None]

    def _take(self, block: bool, timeout: float | None = None) -> Job | None:
        job = self._queue.get(block, timeout)
        if job is not None:
            with self._lock:
                self._pending -= 1
        return job

    def _run(self) -> None:
        while not self._stopping:  # the sentinel None ends the loop once the current work is done
            first = self._take(block=True)
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.config.batch_window_ms / 1000
            while len(batch) < self.config.max_batch:
                try:
                    job = self._take(block=True, timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._stopping = True
                    break
                batch.append(job)
            live = self._live(batch)
            if live:
                self._decode_safely(live)

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs still wanted; the cancelled ones (and all, past the shutdown deadline) are finished here."""
        live = []
        for job in jobs:
            if job.cancelled:
                self._finish(job, "cancelled", 0, None)
            elif self._expired():
                self._finish(job, "cancelled", 0, self._shutdown_error())
            else:
                live.append(job)
        return live

    def _joiners(self, room: int) -> list[Job]:
        """Up to ``room`` queued jobs, without waiting (continuous batching); notes a shutdown sentinel."""
        jobs: list[Job] = []
        while len(jobs) < room and not self._stopping:
            try:
                job = self._take(block=False)
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
            else:
                jobs.append(job)
        return self._live(jobs)

    def _finish(self, job: Job, reason: str, n_new: int, error: str | None) -> None:
        self.finished[reason] += 1
        try:
            job.sink(FinishEvent(reason, len(job.prompt_ids), n_new, error))
        except Exception:  # noqa: BLE001 - a broken sink (closed event loop) must not kill the worker
            job.cancel()

    def _decode_safely(self, jobs: list[Job]) -> None:
        rows: list[RowState] = []
        try:
            self._decode(jobs, rows)
        except Exception as err:  # noqa: BLE001 - fail these requests, keep serving the next ones
            for row in rows:
                if not row.done:
                    self._finish(row.job, "error", len(row.ids), f"{type(err).__name__}: {err}")
            started = {id(r.job) for r in rows}
            for job in jobs:
                if id(job) not in started:
                    self._finish(job, "error", 0, f"{type(err).__name__}: {err}")
        finally:
            self.active_rows = 0

    def _prefill(self, jobs: list[Job], rows: list[RowState]) -> RunningBatch:
        """Start ``jobs``: left-pad their prompts, run the prompt through both passes, sample a first token."""
        device = self.model.device
        first = len(rows)
        rows.extend(RowState(job, self.tokenizer, self.tokenizer_lock, self.eos, device) for job in jobs)
        self.batch_sizes[len(jobs)] += 1
        self.active_rows += len(jobs)  # counted from their prefill on (their first token comes from it)
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's last token is at column -1
            ids[i, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [b, t], as HF's generate for left padding
        batch = RunningBatch(self.model.new_cache(), mask, pos, list(range(first, len(rows))))
        return self._step(batch, ids, rows)

    def _step(self, batch: RunningBatch, step_ids: torch.Tensor, rows: list[RowState]) -> RunningBatch:
        """One forward of ``batch`` on ``step_ids``; sample, release, drop the rows that finished.

        On return ``batch.mask``/``batch.pos``/``batch.next_ids`` describe the next step's input.
        """
        model = self.model
        want = any(rows[i].job.params.return_scalings for i in batch.active)
        out = model(input_ids=step_ids, attention_mask=batch.mask, position_ids=batch.pos, cache=batch.cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # [b, vocab]
        per_token = out.scalings[:, -1].float().mean(1).tolist() if want else None  # [b, E], layers averaged
        next_ids, keep = [], []
        for j, i in enumerate(batch.active):
            row = rows[i]
            token = row.sample(logits[j : j + 1])
            scal = per_token[j] if per_token is not None and row.job.params.return_scalings else None
            try:
                reason = None if row.job.cancelled else row.push(token, scal)
            except Exception:  # noqa: BLE001 - the client's sink failed: treat as a disconnect
                row.job.cancel()
                reason = None
            self.generated_tokens += 1
            if row.job.cancelled:
                reason = "cancelled"
            if reason is None:
                keep.append(j)
                next_ids.append(token)
            else:
                row.done = True
                self._finish(row.job, reason, len(row.ids), None)
        if len(keep) < len(batch.active) and keep:  # drop finished rows from both caches, the mask and positions
            idx = torch.tensor(keep, device=batch.mask.device)
            batch.cache.batch_select_indices(idx)
            batch.mask, batch.pos = batch.mask[idx], batch.pos[idx]
        batch.active = [batch.active[j] for j in keep]
        if keep:
            batch.next_ids = next_ids
            batch.pos = batch.pos[:, -1:] + 1  # [b, 1]
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)
        return batch

    @torch.inference_mode()
    def _decode(self, jobs: list[Job], rows: list[RowState]) -> None:
        """Decode ``jobs`` to the end; jobs queued meanwhile join the running batch (continuous batching).

        A joining job's prompt is prefilled on its own, then its caches are appended to the running
        ones (:meth:`~xlora.generation.XLoraCache.merge_rows`, the shorter left-padded with masked
        zeros), so every row attends to its own tokens only. Models whose caches cannot merge
        (sliding-window layers) let queued jobs wait for the next batch instead.
        """
        batch = self._prefill(jobs, rows)
        self.active_rows = len(batch.active)
        while True:
            room = self.config.max_batch - len(batch.active)
            joiners = self._joiners(room) if room > 0 and batch.cache.can_merge() else []
            if joiners:
                new = self._prefill(joiners, rows)
                self.joined_rows += len(joiners)
                if new.active:
                    batch = batch.merge(new) if batch.active else new
            if not batch.active:
                return
            self.active_rows = len(batch.active)
            if self._expired():
                self._end_rows(batch, rows)
                return
            step_ids = torch.tensor(batch.next_ids, device=batch.mask.device).unsqueeze(1)  # [b, 1]
            batch = self._step(batch, step_ids, rows)

    def _end_rows(self, batch: RunningBatch, rows: list[RowState]) -> None:
        """The shutdown deadline passed: end every running row with the reason."""
        for i in batch.active:
            rows[i].done = True
            self._finish(rows[i].job, "cancelled", len(rows[i].ids), self._shutdown_error())
        batch.active = []

