"""Evaluation records: reading them, which tokens are scored, and left-padded batches.

A record has one of the trainer's shapes (see :mod:`xlora.train.data`), plus an optional ``domain``
label and an optional ``check`` for generated answers (``{"exact": true}``, ``{"rel_tol": x}`` or
``{"abs_tol": x}``). The **scored tokens** of a record:

- ``messages``: the conversation rendered by the tokenizer's chat template, tokenized once; the
  scored tokens are those after ``render(messages[:-1], add_generation_prompt=True)``: the last
  (assistant) message with the template's end-of-turn markup (the trainer's span of that turn).
- ``prompt``/``completion`` with ``chat``: the same, as a user/assistant pair (the trainer's ``chat=True``:
  the prompt encoded as ``xlora generate --chat`` encodes it, then the answer's turn).
- ``prompt``/``completion`` without ``chat``: the completion's tokens (and EOS) after the prompt,
  joined as the trainer joins them.
- ``text``: every token (and EOS), as the trainer scores it.

The loss is the mean negative log-likelihood per scored token (nats); a position ``t`` predicts
token ``t + 1``, so the first token of a sequence is never scored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CHECK_KINDS = ("exact", "rel_tol", "abs_tol")
IGNORE_INDEX = -100  # a label that is not scored (PyTorch's ignore_index, as the trainer writes it)
# The trainer's parsing, handed in by the caller (analysis never imports train; the CLI and the demo pass
# xlora.train.data.tokenize_record and xlora.train.records.iter_records):
TokenizeRecord = Callable[..., tuple[Any, bool]]  # (record, tokenizer, max_length, index, chat=) -> (example, cut)
ReadRecords = Callable[[Path], Iterable[dict[str, Any]]]  # a non-JSONL data file -> its records


@dataclass
class Example:
    """One sequence: ``input_ids`` and ``labels`` of equal length (``-100`` = not scored)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class EvalRecord:
    """One record ready to score.

    Attributes:
        example: token ids and labels (``-100`` = not scored), the scored span last.
        domain: the record's ``domain`` label, or None.
        where: ``"FILE: line N"`` (``record N`` for non-JSONL formats), for messages.
        prompt_ids: the tokens before the scored span (what a generated answer continues).
        reference: the expected answer (the last message's content or the completion), or None (``text``).
        check: the record's ``check`` (``{"exact": true}`` when absent), or None without a reference.
        raw: the record as read (answer checkers get it).
    """

    example: Example
    domain: str | None
    where: str
    prompt_ids: list[int]
    reference: str | None
    check: dict[str, Any] | None
    raw: dict[str, Any]


class BadRecord(ValueError):
    """A record that cannot be scored; the message names the file and line."""


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRecord]]:
    """``(where, record or error)`` per non-blank line: a bad line does not end the file (``--skip-bad``)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}: line {number}"
            try:
                value = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield where, BadRecord(f"{where} is not valid JSON ({e}); each line must be one JSON object")
                continue
            if not isinstance(value, dict):
                yield where, BadRecord(f"{where} is a JSON {type(value).__name__}, not an object")
                continue
            yield where, value


def check_data_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it names a non-empty file.

    Raises:
        FileNotFoundError: it does not exist or is not a file. ValueError: it is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (or is not a file); check the path")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty; it needs at least one record")
    return path


def read_raw(path: str | Path, read_records: ReadRecords | None = None
             ) -> Iterator[tuple[str, dict[str, Any] | BadRecord]]:
    """Stream ``(where, record or error)`` from a data file: JSONL line by line (a bad line does not end
    the file), other formats through ``read_records`` (the trainer's ``iter_records``).

    Raises:
        FileNotFoundError: the file does not exist. ValueError: it holds no record (raised after the last
        line), or it is not JSONL and no ``read_records`` was given.
    """
    path = check_data_file(path)
    if path.suffix.lower() in (".jsonl", ".json") and not _is_json_array(path):
        lines = _json_lines(path)
    elif read_records is None:
        raise ValueError(f"data file {str(path)!r} is not JSON lines; convert it to .jsonl or pass "
                         f"read_records=xlora.train.records.iter_records")
    else:
        lines = ((f"{path}: record {i + 1}", r) for i, r in enumerate(read_records(path)))
    count = 0
    for item in lines:
        count += 1
        yield item
    if count == 0:
        raise ValueError(f"data file {str(path)!r} is empty; it needs at least one record")


def _is_json_array(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def _check_spec(record: dict[str, Any], where: str) -> dict[str, Any]:
    check = record.get("check", {"exact": True})
    if not (isinstance(check, dict) and len(check) == 1 and next(iter(check)) in CHECK_KINDS):
        raise BadRecord(f"{where}: 'check' must be one of {{\"exact\": true}}, {{\"rel_tol\": x}}, {{\"abs_tol\": x}}; "
                        f"got {check!r:.80}")
    kind, value = next(iter(check.items()))
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (kind == "exact" and value is not True) or (kind != "exact" and not (numeric and value >= 0)):
        raise BadRecord(f"{where}: check {check!r} needs true for 'exact' or a number >= 0 for a tolerance")
    return check


def _scored_record(record: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The fields the trainer's tokenizer sees (its shapes, in its order of precedence), and the reference
    answer (None for ``text``); other records go on whole, for the trainer to name what is wrong."""
    if "messages" in record:
        messages = record["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not (isinstance(last, dict) and last.get("role") == "assistant"):
            raise ValueError("its last message is not the assistant's, so there is nothing to score; end the "
                             "conversation with the assistant turn to score")
        return {"messages": messages}, last.get("content")
    if "prompt" in record and "completion" in record:
        return {"prompt": record["prompt"], "completion": record["completion"]}, record["completion"]
    return ({"text": record["text"]} if "text" in record else record), None


def _last_span(labels: list[int]) -> list[int]:
    """Keep only the last run of scored labels (the last assistant turn); earlier turns are context."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)


def make_record(record: dict[str, Any], where: str, tokenizer: Any, *, chat: bool, max_length: int,
                tokenize_record: TokenizeRecord) -> EvalRecord:
    """Tokenize one record for scoring with the trainer's ``tokenize_record`` (see the module doc);
    raises :class:`BadRecord` naming ``where``."""
    try:
        tokenizable, reference = _scored_record(record)
        # chat: a prompt/completion pair as the trainer's --chat renders it (a user turn, then the answer's)
        example, truncated = tokenize_record(tokenizable, tokenizer, max_length + 1, 0, chat=chat)
    except BadRecord:
        raise
    except ValueError as e:
        raise BadRecord(f"{where}: {str(e).removeprefix('record 1: ').removeprefix('record 1 ')}") from e
    if truncated or len(example.input_ids) > max_length:
        raise BadRecord(f"{where}: the record is longer than the model's context of {max_length} tokens; shorten "
                        f"it or drop it (--skip-bad)")
    if not any(t != IGNORE_INDEX for t in example.labels[1:]):
        raise BadRecord(f"{where}: the record has no token to score (empty completion or answer); fill it or drop it")
    labels = _last_span(example.labels)
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    domain = record.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise BadRecord(f"{where}: 'domain' must be a string, got {type(domain).__name__} {domain!r:.40}")
    check = _check_spec(record, where) if reference is not None else None
    return EvalRecord(Example(list(example.input_ids), labels), domain, where, example.input_ids[:first],
                      reference, check, record)


def iter_eval_records(paths: list[str | Path], tokenizer: Any, *, chat: bool, max_length: int,
                      tokenize_record: TokenizeRecord, read_records: ReadRecords | None = None,
                      skip_bad: bool = False, max_records: int | None = None,
                      skipped: list[str] | None = None) -> Iterator[EvalRecord]:
    """Stream the scorable records of ``paths`` in order (at most ``max_records``), tokenized by the
    trainer's ``tokenize_record`` (non-JSONL files read by ``read_records``).

    A bad record (malformed line, nothing to score, longer than ``max_length``, a wrong field) raises
    :class:`BadRecord` naming file and line, or with ``skip_bad`` is left out and its message appended
    to ``skipped``.
    """
    n = 0
    for path in paths:
        for where, item in read_raw(path, read_records):
            if max_records is not None and n >= max_records:
                return
            try:
                if isinstance(item, BadRecord):
                    raise item
                rec = make_record(item, where, tokenizer, chat=chat, max_length=max_length,
                                  tokenize_record=tokenize_record)
            except BadRecord as e:
                if not skip_bad:
                    raise
                if skipped is not None:
                    skipped.append(str(e))
                continue
            n += 1
            yield rec


# -------------------------------------------------------------------------------------- answers
def first_number(text: str) -> float | None:
    """The first number written in ``text`` (thousands commas dropped), or ``None``."""
    m = re.search(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text.replace(",", ""))
    return float(m.group()) if m else None


def check_answer(record: dict[str, Any], answer: str, reference: str | None = None,
                 check: dict[str, Any] | None = None) -> float:
    """1.0 if ``answer`` passes the record's check against its reference answer, else 0.0.

    ``{"exact": true}`` (the default): equal after stripping whitespace. ``{"rel_tol": x}`` /
    ``{"abs_tol": x}``: the first number in each is compared with ``math.isclose``.
    """
    reference = reference if reference is not None else reference_answer(record)
    check = check or record.get("check") or {"exact": True}
    if "exact" in check:
        return float(answer.strip() == reference.strip())
    got, want = first_number(answer), first_number(reference)
    if got is None or want is None:
        return 0.0
    tol = {"rel_tol": check.get("rel_tol", 0.0), "abs_tol": check.get("abs_tol", 0.0)}
    return float(math.isclose(got, want, **tol))


def reference_answer(record: dict[str, Any]) -> str:
    """The reference answer of a raw record: its last message, else its ``completion``."""
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record["completion"]


# -------------------------------------------------------------------------------------- batches
def left_padded(examples: list[Any], pad_id: int) -> dict[str, Any]:
    """Left-pad a batch so that every sequence ends at the last column.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (counting real tokens only) and
    ``labels``, all ``[b, T]``, and ``keep``: the trailing positions whose logits are needed (from
    just before the earliest scored token to the end), so that the LM head runs on those only.
    """
    b, T = len(examples), max(len(e.input_ids) for e in examples)
    ids = torch.full((b, T), pad_id, dtype=torch.long)
    mask = torch.zeros((b, T), dtype=torch.long)
    labels = torch.full((b, T), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):  # right-aligned: every sequence ends at column T - 1
        n = len(e.input_ids)
        ids[row, T - n:], mask[row, T - n:] = torch.tensor(e.input_ids, dtype=torch.long), 1
        # the first token follows nothing of its own (in a padded row, a pad): it is never scored
        labels[row, T - n + 1:] = torch.tensor(e.labels[1:], dtype=torch.long)
    has_loss = (labels != IGNORE_INDEX).any(1)
    first = int((labels != IGNORE_INDEX).float().argmax(1)[has_loss].min()) if has_loss.any() else T - 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "keep": T - max(first, 1) + 1}


def completion_loss(model: Any, batch: dict[str, Any], reduction: str = "mean",
                    **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Cross-entropy of the scored tokens of a :func:`left_padded` batch, and the model output.

    ``reduction``: ``"mean"`` over all scored tokens, ``"sum"``, or ``"none"`` (per-sequence sums ``[b]``).
    ``kwargs`` go to ``model(...)`` (e.g. ``scalings=``).
    """
    keep = batch["keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep, **kwargs)
    logits = out.logits[:, -keep:-1].float()  # [b, keep-1, V]: predictions of the last keep-1 tokens
    labels = batch["labels"][:, -(keep - 1):]  # [b, keep-1]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view(labels.shape)
    if reduction == "none":
        return ce.sum(1), out
    total = ce.sum()
    return (total if reduction == "sum" else total / (labels != IGNORE_INDEX).sum().clamp_min(1)), out
