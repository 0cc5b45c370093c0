"""One request's life in the server: the events it receives, its per-row decoding state (its
:class:`~xlora.serve.sampling.Sampler`; incremental, stop-aware text release), and the state of the
running batch that its row belongs to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xlora.serve.sampling import Sampler, SamplingParams


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

class RowState:
    """Decoding state of one job: its generated ids, the text already released, stop handling."""

    def __init__(self, job: Job, tokenizer: Any, lock: threading.Lock, eos: set[int], device: torch.device) -> None:
        self.job, self.tokenizer, self.lock, self.eos = job, tokenizer, lock, eos
        self.ids: list[int] = []
        self.done = False
        self.text = ""  # the decoded text of ``ids`` so far (complete characters only)
        self.sent = 0  # characters of ``text`` already released
        self._prefix = 0  # ids[_prefix:_read] is re-decoded as context for the new tokens
        self._read = 0  # ids[:_read] are in ``text``
        self.sample = Sampler(job.params, job.prompt_ids, device)  # raw logits [1, vocab] -> next token

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


@dataclass(eq=False)
class RunningBatch:
    """The running batch: both caches, the attention mask ``[b, T]`` and positions ``[b, t_step]``
    of the next step, the indices (into the worker's rows) of its rows, and their next input tokens."""

    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    active: list[int]
    next_ids: list[int] = field(default_factory=list)

    def merge(self, other: RunningBatch) -> RunningBatch:
        """Append ``other``'s rows (both already sampled, about to feed ``next_ids``)."""
        pad_self, pad_other = self.cache.merge_rows(other.cache)
        mask = torch.cat([torch.nn.functional.pad(self.mask, (pad_self, 0)),
                          torch.nn.functional.pad(other.mask, (pad_other, 0))], dim=0)
        return RunningBatch(self.cache, mask, torch.cat([self.pos, other.pos], dim=0),
                            self.active + other.active, self.next_ids + other.next_ids)
