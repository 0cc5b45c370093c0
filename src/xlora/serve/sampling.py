"""One sampling semantics: the server samples each row with transformers' own logits processors.

A request's ``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``repetition_penalty`` become the
``LogitsProcessorList`` that ``model.generate(**params.generate_kwargs())`` builds, in the same
order, applied per row to that row's float32 logits ``[1, vocab]`` and its own history (prompt and
generated tokens, never padding). The token is then drawn as ``generate()`` draws it,
``torch.multinomial(softmax(scores), 1)``, from the row's own ``torch.Generator`` seeded with
``seed``; ``temperature=0`` is greedy (argmax of the processed scores). So a request with ``seed=s``
gives the tokens of ``torch.manual_seed(s); model.generate(**params.generate_kwargs())``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingParams:
    """Per-request decoding parameters (the names and meanings of ``generate()``'s).

    Args:
        max_tokens: the most tokens to generate (>= 1).
        temperature: softmax temperature; ``0`` is greedy (argmax).
        top_p: nucleus sampling mass in ``(0, 1]``.
        top_k: keep the ``k`` most likely tokens; ``0`` keeps all (unlike ``generate()``, whose
            default is 50, OpenAI's API has no top-k, so none is applied unless asked for).
        min_p: drop tokens less likely than ``min_p`` times the most likely one; ``None`` is off.
        repetition_penalty: transformers' multiplicative penalty on tokens already in the row
            (prompt included); ``1`` is off.
        stop: strings that end the completion; the stop string itself is not returned.
        seed: seeds this row's own ``torch.Generator`` (random when ``None``).
        return_scalings: report each generated token's layer-averaged expert weights ``[E]``.
        ignore_eos: keep generating after the end-of-sequence token (for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_scalings: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "pass an integer >= 1")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "pass a number >= 0 (0 = greedy)")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "pass a number in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
               "pass an integer >= 0 (0 = no top-k)")
        _check(self.min_p is None or (_finite(self.min_p) and 0 <= self.min_p <= 1), "min_p", self.min_p,
               "pass a number in [0, 1] or None")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "pass a number > 0 (1 = no penalty)")
        self.stop = tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "pass non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``model.generate()`` arguments that sample as this request does (seed aside)."""
        kwargs: dict[str, Any] = {"do_sample": not self.greedy, "repetition_penalty": self.repetition_penalty}
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
            if self.min_p is not None:
                kwargs["min_p"] = self.min_p
        return kwargs

    def processors(self) -> LogitsProcessorList:
        """The processors ``generate(**self.generate_kwargs())`` applies, in its order."""
        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.greedy:  # generate() applies the warpers only when sampling
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k != 0:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        if self.min_p is not None:
            out.append(MinPLogitsWarper(self.min_p))
        return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {fix}")


class Sampler:
    """One row's sampler: its processors, its generator and its token history.

    Args:
        params: the row's parameters.
        prompt_ids: the row's prompt (the repetition penalty's history starts with it).
        device: where the row's logits live.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device | str) -> None:
        self.params = params
        self.processors = params.processors()
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._history: torch.Tensor | None = None  # [1, prompt + max_tokens], filled as tokens come
        self._length = len(prompt_ids)
        if any(isinstance(p, RepetitionPenaltyLogitsProcessor) for p in self.processors):
            self._history = torch.zeros(1, len(prompt_ids) + params.max_tokens, dtype=torch.long, device=device)
            self._history[0, : len(prompt_ids)] = torch.tensor(prompt_ids, device=device)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed scores ``[1, vocab]`` of this row's raw logits ``[1, vocab]`` (as float32)."""
        scores = logits.to(dtype=torch.float32, copy=True)  # as generate(): processors never touch the batch's logits
        if not self.processors:
            return scores
        history = self._history[:, : self._length] if self._history is not None else _NO_HISTORY
        return self.processors(history, scores)

    def __call__(self, logits: torch.Tensor) -> int:
        """Draw the next token from raw logits ``[1, vocab]`` and append it to the history."""
        scores = self.scores(logits)
        if self.params.greedy:
            token = int(scores.argmax(-1))
        else:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        if self._history is not None and self._length < self._history.shape[1]:
            self._history[0, self._length] = token
        self._length += 1
        return token


_NO_HISTORY = torch.zeros(1, 0, dtype=torch.long)  # warpers other than the repetition penalty ignore it
