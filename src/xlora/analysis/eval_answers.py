"""Greedy answers and task scores of the evaluation engine's rows (:mod:`xlora.analysis.evaluate`).

Every row but Arrow is the same :class:`~xlora.model.XLoraModel` with other scalings; the rows whose scalings
are fixed by hand answer in shared left-padded batches, each sequence with its own ``[L, E]`` scalings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xlora.analysis.eval_data import EvalRecord, Example, left_padded
from xlora.analysis.eval_report import ORACLE, EvalResult
from xlora.generation import pad_token_id

ARROW = "arrow"
Checker = Callable[[dict[str, Any], str], float]


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   scalings: Any = None) -> list[str]:
    """Greedy answers to token-id prompts, left-padded in batches; an X-LoRA model uses ``scalings``
    (see :meth:`~xlora.model.XLoraModel.resolve_scalings`; a tensor ``[len(prompts), L, E]`` gives each
    prompt its own scalings), any other model (Arrow) runs as it is."""
    pad = pad_token_id(tokenizer)
    per_prompt = isinstance(scalings, torch.Tensor) and scalings.dim() == 3
    if per_prompt and scalings.shape[0] != len(prompts):
        raise ValueError(f"per-prompt scalings of shape {tuple(scalings.shape)} for {len(prompts)} prompts: "
                         "give one [L, E] row per prompt")
    texts = []
    for i in range(0, len(prompts), batch_size):
        batch = left_padded([Example(p, p) for p in prompts[i:i + batch_size]], pad)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                  do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        if hasattr(model, "fixed_scalings"):
            with model.fixed_scalings(scalings[i:i + batch_size] if per_prompt else scalings):
                out = model.generate(**kw)
        else:
            out = model.generate(**kw)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def task_scores(model: Any, tokenizer: Any, samples: list[EvalRecord], result: EvalResult, fixed: dict[str, Any],
                arrow: Any, checker: Checker, budget: Callable[[EvalRecord], int], batch_size: int,
                expert_answers: str = "all") -> None:
    """Fill ``result``'s task scores and answers: each row answers ``samples`` (an expert only its own domain's
    with ``expert_answers == "own"``); oracle takes the own expert's.

    The rows whose scalings are fixed by hand (base, the experts, uniform) answer in shared batches, each
    sequence with its own row's scalings (``[n, L, E]``), so that a few answers per row do not each cost a
    whole generation; X-LoRA and Arrow answer on their own.
    """
    names = set(model.xlora_config.expert_names)
    rows = [*fixed, *([ARROW] if arrow is not None else [])]
    jobs: dict[tuple[str, int], list[tuple[str, int]]] = {}  # (runner, answer budget) -> [(row, sample index)]
    for row in rows:
        own = expert_answers == "own" and row in names
        runner = "fixed" if fixed.get(row) is not None else row
        for i, rec in enumerate(samples):
            if not own or rec.domain == row:
                jobs.setdefault((runner, budget(rec)), []).append((row, i))
    answers: dict[str, list[str | None]] = {row: [None] * len(samples) for row in rows}
    for (runner, n_new), pairs in jobs.items():
        spec = None
        if runner == "fixed":
            spec = torch.stack([model.resolve_scalings(fixed[row]) for row, _ in pairs])  # [n, L, E]
        texts = greedy_answers(arrow if runner == ARROW else model, tokenizer, [samples[i].prompt_ids for _, i in pairs],
                               n_new, batch_size, spec)
        for (row, i), text in zip(pairs, texts):
            answers[row][i] = text
    result.answers.update(answers)
    if ORACLE in result.configs:
        result.answers[ORACLE] = [result.answers[s.domain][i] if s.domain in names and s.domain in result.answers
                                  else None for i, s in enumerate(samples)]
    result.samples = [s.raw for s in samples]
    result.set_task_scores(samples, checker)
    for row in names if expert_answers == "own" else ():  # one domain answered: no mixed score
        if result.configs.get(row, {}).get("task_score"):
            result.configs[row]["task_score"].pop("mixed", None)
