"""Dynamic batching for serving: one worker thread owns the model and decodes requests together.

Requests that arrive within ``batch_window_ms`` of the first one (up to ``max_batch``) form a
batch: their prompts are left-padded, prefilled once with an :class:`~xlora.generation.XLoraCache`
and decoded step by step, each row with its own sampling parameters and ``torch.Generator``.
Finished or cancelled rows leave the batch at once (``cache.batch_select_indices`` on both
caches, and the same rows of the attention mask and positions), so they stop costing compute.
Requests arriving while a batch runs wait in the queue for the next batch: simple, and no
request's cache is ever shared with another's (no continuous batching).
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """Per-request decoding parameters.

    Args:
        max_tokens: the most tokens to generate (>= 1).
        temperature: softmax temperature; ``0`` is greedy (argmax).
        top_p: nucleus sampling mass in ``(0, 1]``.
        stop: strings that end the completion; the stop string itself is not returned.
        seed: seeds this row's own ``torch.Generator`` (random when ``None``).
        return_scalings: report each generated token's layer-averaged expert weights ``[E]``.
        ignore_eos: keep generating after the end-of-sequence token (for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_scalings: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")


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


@dataclass
class TokenEvent:
    """One generated token: the text it released (possibly ``""``, held back for a stop string)."""

    text: str
    token_id: int
    scalings: list[float] | None = None  # [E], averaged over the L adapted modules


@dataclass
class FinishEvent:
    """The end of a request: ``reason`` is ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | FinishEvent


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue``."""


class ShuttingDown(RuntimeError):
    """The batcher accepts no new requests."""


@dataclass(eq=False)
class Job:
    """A submitted request. ``sink`` receives its events, on the worker thread, in order."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the worker to drop this row at its next step (e.g. the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Row:
    """Decoding state of one job: its generated ids, the text already released, stop handling."""

    def __init__(self, job: Job, tokenizer: Any, lock: threading.Lock, eos: set[int], device: torch.device) -> None:
        self.job, self.tokenizer, self.lock, self.eos = job, tokenizer, lock, eos
        self.ids: list[int] = []
        self.done = False
        self.text = ""  # the decoded text of ``ids`` so far (complete characters only)
        self.sent = 0  # characters of ``text`` already released
        self._prefix = 0  # ids[_prefix:_read] is re-decoded as context for the new tokens
        self._read = 0  # ids[:_read] are in ``text``
        seed = job.params.seed if job.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Next token from this row's logits ``[vocab]`` with its temperature, top-p and generator."""
        p = self.job.params
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest prefix holding top_p
            probs = probs.scatter(0, order[drop], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int, scalings: list[float] | None) -> str | None:
        """Record ``token``, emit its event; returns the finish reason once the row is done."""
        self.ids.append(token)
        p = self.job.params
        text = self._extend_text()
        reason, end = None, len(text)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in p.stop) if i >= 0]
        if hits:
            reason, end = "stop", max(min(hits), self.sent)  # OpenAI drops the stop string and what follows
        elif token in self.eos and not p.ignore_eos:
            reason = "stop"
        elif len(self.ids) >= p.max_tokens:
            reason = "length"
        else:
            end = self._safe_end(text)
        self.job.sink(TokenEvent(text[self.sent:end], token, scalings))
        self.sent = max(self.sent, end)
        return reason

    def _extend_text(self) -> str:
        """``text`` extended by the new tokens, decoding only a short window (linear in the length).

        The window ``ids[_prefix:]`` is decoded and the text of its already-read part
        ``ids[_prefix:_read]`` is cut off its front, so that tokenizers whose pieces depend on their
        left neighbour (a leading space, a multi-byte character split over tokens) decode as the
        whole sequence does. A window ending in an incomplete character waits for the next token.
        """
        with self.lock:
            seen = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not window.startswith(seen):  # a tokenizer this trick does not fit: decode everything
            with self.lock:
                self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            self._read = len(self.ids)
            return self.text
        p = self.job.params
        last = len(self.ids) >= p.max_tokens or (self.ids[-1] in self.eos and not p.ignore_eos)
        if window.endswith("\ufffd") and not last:  # an incomplete character: wait for the next token
            return self.text
        self.text += window[len(seen):]
        self._prefix, self._read = self._read, len(self.ids)
        return self.text

    def _safe_end(self, text: str) -> int:
        """How much of ``text`` can be released: hold back a partial character or a stop-string prefix."""
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        hold = 0
        for s in self.job.params.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text.endswith(s[:k], 0, end):
                    hold = k
                    break
        return max(end - hold, self.sent)


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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0  # jobs submitted and not yet in a batch
        self._lock = threading.Lock()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._cancel_running = False
        # statistics, read by the server's /metrics
        self.active_rows = 0
        self.generated_tokens = 0
        self.batch_sizes: Counter[int] = Counter()  # batch size at prefill -> number of batches
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

    def begin_shutdown(self) -> None:
        """Stop accepting jobs; queued and running ones still complete."""
        with self._lock:
            self._accepting = False

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let the worker finish its work for up to ``timeout`` s, then cancel the rest."""
        self.begin_shutdown()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # out of patience: running rows are cancelled at their next step
                self._cancel_running = True
                self._thread.join(5.0)
        for job in self._drain():  # never started: finish them so no client waits forever
            self._finish(job, "cancelled", 0, "the server shut down before this request started")

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
        stopping = False  # the sentinel None came inside a batch window: finish this batch, then stop
        while not stopping:
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
                    stopping = True
                    break
                batch.append(job)
            live = []
            for job in batch:
                if job.cancelled or self._cancel_running:
                    self._finish(job, "cancelled", 0, None)
                else:
                    live.append(job)
            if live:
                self._decode_safely(live)

    def _finish(self, job: Job, reason: str, n_new: int, error: str | None) -> None:
        self.finished[reason] += 1
        try:
            job.sink(FinishEvent(reason, len(job.prompt_ids), n_new, error))
        except Exception:  # noqa: BLE001 - a broken sink (closed event loop) must not kill the worker
            job.cancel()

    def _decode_safely(self, jobs: list[Job]) -> None:
        rows: list[_Row] = []
        try:
            self._decode(jobs, rows)
        except Exception as err:  # noqa: BLE001 - fail these requests, keep serving the next ones
            started = {id(r.job): r for r in rows}
            for job in jobs:
                row = started.get(id(job))
                if row is None or not row.done:
                    self._finish(job, "error", len(row.ids) if row else 0, f"{type(err).__name__}: {err}")
        finally:
            self.active_rows = 0

    @torch.inference_mode()
    def _decode(self, jobs: list[Job], rows: list[_Row]) -> None:
        model, device = self.model, self.model.device
        rows.extend(_Row(job, self.tokenizer, self.tokenizer_lock, self.eos, device) for job in jobs)
        self.batch_sizes[len(rows)] += 1
        self.active_rows = len(rows)
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's last token is at column -1
            ids[i, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [b, t], as HF's generate for left padding
        cache = model.new_cache()
        active = list(range(len(rows)))  # indices into `rows` of the rows still in the batch
        step_ids, step_pos = ids, pos
        while True:
            want = any(rows[i].job.params.return_scalings for i in active)
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache,
                        use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]  # [b, vocab]
            per_token = out.scalings[:, -1].float().mean(1).tolist() if want else None  # [b, E], layers averaged
            next_ids, keep = [], []
            for j, i in enumerate(active):
                row = rows[i]
                token = row.sample(logits[j])
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
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows from both caches, the mask and positions
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                mask, step_pos = mask[idx], step_pos[idx]
                active = [active[j] for j in keep]
                self.active_rows = len(active)
            step_ids = torch.tensor(next_ids, device=device).unsqueeze(1)  # [b, 1]
            step_pos = step_pos[:, -1:] + 1  # [b, 1]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            if self._cancel_running:
                for i in active:
                    rows[i].job.cancel()
