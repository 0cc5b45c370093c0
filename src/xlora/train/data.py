"""Training data for X-LoRA: records from JSONL (or any `datasets` format) to padded batches.

Three record shapes are understood (one per record; files may mix them):

- ``{"text": str}``: loss on every token; the tokenizer's EOS is appended if it has one.
- ``{"prompt": str, "completion": str}``: loss on the completion and what ends it only. Raw (the
  default): the prompt's tokens (with the tokenizer's special tokens, e.g. BOS) then the completion's
  tokens and EOS, each tokenized on its own and joined with nothing between them; the model sees this
  text as ``xlora generate PROMPT`` (no ``--chat``) gives it. With ``chat=True``: the prompt is encoded
  exactly as ``xlora generate --chat`` encodes it (:func:`xlora.generation.encode_prompt`: a user turn
  and the assistant header), followed by the rest of the rendered ``[user, assistant]`` conversation:
  the completion and the template's end-of-turn markup, which take the loss.
- ``{"messages": [{"role": str, "content": str}, ...]}``: rendered with the tokenizer's chat
  template; loss on the assistant turns only. An assistant turn's loss span is the text between
  ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``: its
  content *plus the template's closing markup for that turn* (e.g. ``</s>``, ``<|im_end|>``), so the
  model learns to stop; the role header is not in the loss. The full conversation is tokenized once
  (fast tokenizers map tokens to spans by character offsets), so training sees the same tokens as
  inference.

Labels are ``-100`` where no loss is taken. Record indices are 0-based in arguments and 1-based in
messages ("record 12" is the 12th line of data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlora.train.batching import batch_order as batch_order  # re-exported: its home before batching.py
from xlora.train.records import iter_records
from xlora.train.routing import record_target, routing_targets

IGNORE_INDEX = -100
SHAPES = ('{"text": str}, {"prompt": str, "completion": str}, '
          '{"messages": [{"role": str, "content": str}, ...]}')
# At most CHARS_PER_TOKEN * (max_length + 1) characters of a record reach the tokenizer, so a 50 MB
# line costs what a short one does. Prose and code average 3-5 characters per token with BPE and
# SentencePiece vocabularies (a character-level tokenizer: 1), so 64 is over 10x the need: a cut
# record still yields more than max_length tokens and the kept ones are those of the whole text.
# Only text dominated by tokens longer than 64 characters (long runs of one symbol that the
# vocabulary has as single tokens) may come out shorter than max_length; it is still a valid example.
CHARS_PER_TOKEN = 64


@dataclass
class TokenizedExample:
    """One training sequence: ``input_ids`` and ``labels`` of equal length (``-100`` = no loss), and the expert
    names its record routes to (``target``, empty: none; see :mod:`xlora.train.routing`)."""

    input_ids: list[int]
    labels: list[int]
    target: tuple[str, ...] = ()


@dataclass
class DatasetStats:
    """What ``build_dataset`` did: records read, examples produced, records truncated, loss tokens."""

    num_records: int
    num_examples: int
    num_truncated: int
    num_loss_tokens: int


# -------------------------------------------------------------------------------------- tokenizing
def record_kind(record: dict, index: int) -> str:
    """The shape of a record: ``"text"``, ``"prompt_completion"`` or ``"messages"``.

    Args:
        record: one record as read by :func:`~xlora.train.records.iter_records`.
        index: its 0-based position (messages print it 1-based).

    Raises:
        ValueError: the record has none of the three shapes; the message lists its keys.
    """
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if "text" in record:
            return "text"
        keys = sorted(map(str, record))
    else:
        keys = f"none (it is a {type(record).__name__})"
    raise ValueError(f"record {index + 1} has keys {keys}, which match none of the supported shapes "
                     f"{SHAPES}; rename its fields to one of them")


class _CharBudget:
    """A record's text fields, in order, share one character budget; ``cut`` says whether text was dropped."""

    def __init__(self, max_length: int) -> None:
        self.left, self.cut = CHARS_PER_TOKEN * (max_length + 1), False

    def take(self, text: str) -> str:
        kept = text[:self.left]
        self.left -= len(kept)
        self.cut = self.cut or len(kept) < len(text)
        return kept


def tokenize_record(record: dict, tokenizer: Any, max_length: int, index: int = 0,
                    chat: bool = False) -> tuple[TokenizedExample, bool]:
    """Tokenize one record and mask the tokens that take no loss.

    Only the first ``CHARS_PER_TOKEN * (max_length + 1)`` characters of the record's text fields
    (together, in order) are tokenized, so time and memory are bounded whatever the record's size;
    a record cut this way gets no EOS (its end was not reached) and counts as truncated.

    Args:
        record: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}`` (see the module doc).
        tokenizer: a Hugging Face tokenizer; ``messages`` need its ``chat_template``.
        max_length: keep at most this many tokens (the beginning).
        index: the record's 0-based position, for error messages.
        chat: render a ``prompt``/``completion`` record with the chat template (see the module doc).

    Returns:
        ``(example, truncated)``: ``example.input_ids`` and ``example.labels`` are ``[n]`` with
        ``n <= max_length``; ``truncated`` says whether tokens were cut. An example may be left with
        no loss token after truncation; the caller decides what to do with it.

    Raises:
        ValueError: unknown shape, a field of the wrong type, a conversation without an assistant
            turn, or a tokenizer without a chat template.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    kind = record_kind(record, index)
    where = f"record {index + 1}"
    budget = _CharBudget(max_length)
    if kind == "text":
        ids = _encode(tokenizer, budget.take(_string(record, "text", where)), special=True)
        ids += [] if budget.cut else _eos(tokenizer)
        labels = list(ids)
    elif kind == "prompt_completion":
        prompt_text, completion_text = _string(record, "prompt", where), _string(record, "completion", where)
        if chat:
            prompt, completion = _chat_pair(budget.take(prompt_text), budget.take(completion_text), budget.cut,
                                            tokenizer, where)
        else:
            prompt = _encode(tokenizer, budget.take(prompt_text), special=True)
            completion = _encode(tokenizer, budget.take(completion_text), special=False)
            completion += [] if budget.cut else _eos(tokenizer)
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    else:
        ids, labels = _tokenize_chat(record["messages"], tokenizer, where, budget)
    truncated = budget.cut or len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length]), truncated


def _string(record: dict, field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def _chat_pair(prompt: str, completion: str, cut: bool, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``: the prompt as ``xlora generate --chat`` encodes it, then the completion
    and the template's end of the assistant turn (the completion alone when it was cut)."""
    from xlora.generation import encode_prompt  # the one prompt encoder of generation

    try:
        prompt_ids = encode_prompt(tokenizer, prompt, chat=True)["input_ids"][0].tolist()
    except ValueError as e:  # no chat template
        raise ValueError(f"{where}: {e} (--chat applies to training data as at generation)") from None
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    head = tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    if not full.startswith(head):
        raise ValueError(f"{where}: the chat template renders the answer's turn without the generation prompt "
                         "before it, so the completion cannot be located; train without --chat or use messages")
    return prompt_ids, _encode(tokenizer, completion if cut else full[len(head):], special=False)


def _tokenize_chat(messages: Any, tokenizer: Any, where: str, budget: _CharBudget) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, "
                         f"got {type(messages).__name__} {messages!r:.60}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: messages[{j}] must be an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                got = "it is missing" if field not in m else f"got {type(m[field]).__name__}"
                raise ValueError(f"{where}: messages[{j}].{field} must be a string ({got})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no 'assistant' message, so there is nothing to learn; "
                         f"add one or drop the record")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where} uses 'messages' but the tokenizer has no chat_template; use a tokenizer with "
                         f"one (an instruct model's) or convert the data to prompt/completion records")
    messages = [{**m, "content": budget.take(m["content"])} for m in messages]

    def render(prefix: list[dict], generation_prompt: bool = False) -> str:
        if not prefix:  # templates cannot render an empty conversation
            return ""
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own checks (role order, …)
            raise ValueError(f"{where}: the chat template failed on this conversation: {e}") from e

    full = render(messages)
    spans: list[tuple[int, int]] = []  # character spans of the assistant turns in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        end_text = render(messages[: i + 1])
        start_text = render(messages[:i], generation_prompt=True)
        if not end_text.startswith(start_text):  # the generation prompt differs from the turn's header
            start_text = render(messages[:i])
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise ValueError(f"{where}: the chat template does not render message {i} as a prefix of the whole "
                             f"conversation (it rewrites earlier turns), so assistant tokens cannot be located; "
                             f"split the conversation or convert it to prompt/completion records")
        spans.append((len(start_text), len(end_text)))
    return _encode_spans(tokenizer, full, spans)


def _encode_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``text``; a token takes loss iff it starts inside one of ``spans`` (character ranges)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                  for t, (s, _) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    # No offsets: tokenize the pieces between span boundaries separately and concatenate.
    ids, labels, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, loss in ((text[pos:a], False), (text[a:b], True)):
            piece_ids = _encode(tokenizer, piece, special=False) if piece else []
            ids += piece_ids
            labels += piece_ids if loss else [IGNORE_INDEX] * len(piece_ids)
        pos = b
    return ids, labels


# -------------------------------------------------------------------------------------- assembling
def build_dataset(path: str | Path, tokenizer: Any, max_length: int, packing: bool = False,
                  chat: bool = False, routing_key: str | None = None) -> tuple[list[TokenizedExample], DatasetStats]:
    """Read and tokenize a data file, optionally packing examples into ``max_length`` chunks.

    With ``packing``, the examples (each ending with EOS where the tokenizer has one) are
    concatenated and cut into chunks of exactly ``max_length`` tokens (the last may be shorter),
    labels carried along; attention is not masked across example boundaries. ``chat`` renders
    ``prompt``/``completion`` records with the chat template (see the module doc). ``routing_key``: read each
    record's routing target (:func:`~xlora.train.routing.record_target`) into ``example.target``; packed
    examples carry none.

    Records are truncated to ``max_length`` before packing too. Examples whose loss tokens were
    all truncated away are kept. Returns ``(examples, stats)``.

    Raises:
        ValueError: bad records (the message starts with the file and names the record), or no
            example has a loss token.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    examples, num_records, num_truncated = [], 0, 0
    for index, record in enumerate(iter_records(path)):  # streamed: one raw record in memory at a time
        try:
            example, truncated = tokenize_record(record, tokenizer, max_length, index, chat=chat)
            if routing_key is not None:
                example.target = record_target(record, routing_key)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        examples.append(example)
        num_records += 1
        num_truncated += truncated
    if packing:
        examples = _pack(examples, max_length)
    num_loss = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    if num_loss == 0:
        raise ValueError(f"{path}: none of the {num_records} records has a token to train on after truncation "
                         f"to max_length={max_length}; raise max_length or check the assistant/completion fields")
    return examples, DatasetStats(num_records, len(examples), num_truncated, num_loss)


def _pack(examples: list[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    return [TokenizedExample(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]


def collate(examples: list[TokenizedExample], pad_token_id: int, side: str = "right",
            experts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch on the right (training) or on the ``side="left"`` (every sequence ends at the last column).

    Args:
        examples: ``b`` examples of lengths ``n_i``.
        pad_token_id: the id written into padded ``input_ids`` positions.
        experts: the expert names in the scalings' order: also return the examples' routing targets.

    Returns:
        ``input_ids`` ``[b, T]`` (padded with ``pad_token_id``), ``attention_mask`` ``[b, T]`` (1 real,
        0 pad) and ``labels`` ``[b, T]`` (``-100`` on pad; left-padded, also on each row's first token, which
        follows nothing of its own: the pad before it would otherwise predict it), all ``int64``,
        ``T = max(n_i)``; with ``experts`` also ``routing_target`` ``[b, E]`` float32 (:func:`~xlora.train.routing.routing_targets`).
    """
    if not examples:
        raise ValueError("collate got an empty list of examples; a batch needs at least one")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    b, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, T), dtype=torch.long)
    labels = torch.full((b, T), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        input_ids[row, cols] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(e.labels, dtype=torch.long)
        if side == "left":  # the first token follows nothing of its own: the pad before it must not predict it
            labels[row, cols.start] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if experts is not None:
        batch["routing_target"] = routing_targets([e.target for e in examples], experts)
    return batch
