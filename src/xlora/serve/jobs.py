"""One request's life in the server: its sampling parameters, the events it receives, and the
per-row decoding state (sampling with its own generator; incremental, stop-aware text release).
"""

from __future__ import annotations

import random
import threading
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
