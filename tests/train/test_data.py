"""The data layer: exact tokens and loss masks for each record shape, packing, batching, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from xlora.train.data import (
    CHARS_PER_TOKEN,
    DatasetStats,
    TokenizedExample,
    batch_order,
    build_dataset,
    collate,
    record_kind,
    tokenize_record,
)
from xlora.train.losses import loss_tokens
from xlora.train.records import iter_records, read_records

M = -100
EOS = 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    """Character ids by hand from the vocabulary (not through the tokenizer's encoder)."""
    return tok.convert_tokens_to_ids(list(text))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


CHAT = {"messages": [
    {"role": "system", "content": "be"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "sure"},
]}


# ------------------------------------------------------------------------------------------ shapes
def test_vocabulary_is_what_the_tests_assume(tok):
    assert ids(tok, "a b") == [69, 4, 70] and tok.eos_token_id == EOS and tok.pad_token_id == 0


def test_text_record_has_loss_everywhere_and_ends_with_eos(tok):
    example, truncated = tokenize_record({"text": "abc"}, tok, max_length=16)
    assert example == TokenizedExample(ids(tok, "abc") + [EOS], ids(tok, "abc") + [EOS])
    assert truncated is False


def test_prompt_completion_takes_loss_on_completion_and_eos_only(tok):
    example, truncated = tokenize_record({"prompt": "Q:", "completion": "42"}, tok, max_length=16)
    assert example.input_ids == ids(tok, "Q:42") + [EOS]
    assert example.labels == [M, M] + ids(tok, "42") + [EOS]
    assert not truncated


def test_prompt_completion_with_chat_is_the_generate_chat_prompt_then_the_answer_turn(tok):
    from xlora.generation import encode_prompt

    record = {"prompt": "Q:", "completion": "42"}
    example, truncated = tokenize_record(record, tok, max_length=32, chat=True)
    prompt = ids(tok, "<user>Q:") + [EOS] + ids(tok, "<assistant>")  # the template: <role>content</s>
    assert example.input_ids == prompt + ids(tok, "42") + [EOS]
    assert example.labels == [M] * len(prompt) + ids(tok, "42") + [EOS]  # the answer and its end of turn
    assert encode_prompt(tok, "Q:", chat=True)["input_ids"][0].tolist() == prompt  # what generate --chat feeds
    assert not truncated
    raw, _ = tokenize_record(record, tok, max_length=32)  # the default: joined raw, as before
    assert raw.input_ids == ids(tok, "Q:42") + [EOS]
    cut, truncated = tokenize_record({"prompt": "Q:", "completion": "x" * 10_000}, tok, max_length=20, chat=True)
    assert truncated and cut.input_ids == prompt + ids(tok, "x" * (20 - len(prompt)))  # no end of turn: cut


def test_chat_data_needs_a_chat_template(tok, tmp_path):
    plain = tiny_tokenizer()
    plain.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "completion": "42"}])
    with pytest.raises(ValueError) as err:
        build_dataset(path, plain, 32, chat=True)
    assert str(err.value) == (f"{path}: record 1: chat=True but the tokenizer has no chat_template; drop --chat or "
                              "use a chat model (--chat applies to training data as at generation)")
    examples, stats = build_dataset(path, tok, 32, chat=True)
    assert examples[0] == tokenize_record({"prompt": "Q:", "completion": "42"}, tok, 32, chat=True)[0]
    assert stats.num_loss_tokens == 3


def test_chat_loss_covers_assistant_content_and_its_closing_token_only(tok):
    example, truncated = tokenize_record(CHAT, tok, max_length=200)
    # The template renders "<role>content</s>" per message; "</s>" is one token (EOS).
    expected_ids, expected_labels = [], []
    for m in CHAT["messages"]:
        header, body = ids(tok, f"<{m['role']}>"), ids(tok, m["content"]) + [EOS]
        expected_ids += header + body
        expected_labels += [M] * len(header) + (body if m["role"] == "assistant" else [M] * len(body))
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    assert not truncated
    learned = [t for t in example.labels if t != M]
    assert learned == ids(tok, "yo") + [EOS] + ids(tok, "sure") + [EOS]


def test_chat_matches_the_template_rendering_used_at_inference(tok):
    example, _ = tokenize_record(CHAT, tok, max_length=200)
    text = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert example.input_ids == tok(text, add_special_tokens=False)["input_ids"]


class SlowTokenizer:
    """The char tokenizer without offsets (``is_fast=False``), to exercise the piecewise path."""

    is_fast = False

    def __init__(self, tok):
        self.tok, self.chat_template, self.eos_token_id = tok, tok.chat_template, tok.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def apply_chat_template(self, *args, **kwargs):
        return self.tok.apply_chat_template(*args, **kwargs)


def test_chat_without_offsets_gives_the_same_example(tok):
    assert tokenize_record(CHAT, SlowTokenizer(tok), 200) == tokenize_record(CHAT, tok, 200)


def test_chat_header_differing_from_generation_prompt_is_learned_with_the_turn(tok):
    # The generation prompt "<bot>" is not what the turn renders ("<assistant>"): fall back to the
    # prefix without it, so the turn's header takes loss too.
    odd = tiny_tokenizer()
    odd.chat_template = tok.chat_template.replace("<assistant>{% endif", "<bot>{% endif")
    record = {"messages": CHAT["messages"][1:3]}
    example, _ = tokenize_record(record, odd, 64)
    assert [t for t in example.labels if t != M] == ids(odd, "<assistant>yo") + [EOS]


def test_chat_template_that_rewrites_earlier_turns_is_an_error(tok):
    rewriting = tiny_tokenizer()
    rewriting.chat_template = ("{% for m in messages %}<{{ m['role'] }}>"
                               "{{ m['content'] if loop.last else 'x' }}</s>{% endfor %}")
    with pytest.raises(ValueError, match="record 1: the chat template does not render message 2 as a prefix"):
        tokenize_record(CHAT, rewriting, 200)


def test_record_kind_of_each_shape():
    assert record_kind({"text": "x"}, 0) == "text"
    assert record_kind({"prompt": "x", "completion": "y"}, 0) == "prompt_completion"
    assert record_kind({"messages": []}, 0) == "messages"


# -------------------------------------------------------------------------------------- truncation
def test_truncation_keeps_the_beginning(tok):
    example, truncated = tokenize_record({"text": "abcdef"}, tok, max_length=4)
    assert example.input_ids == ids(tok, "abcd") == example.labels
    assert truncated is True
    # Exactly max_length tokens (5 characters + EOS = 6) is not truncated.
    assert tokenize_record({"text": "abcde"}, tok, max_length=6)[1] is False


def test_record_whose_loss_is_truncated_away_is_still_returned(tok):
    example, truncated = tokenize_record({"prompt": "long prompt", "completion": "x"}, tok, max_length=5)
    assert example == TokenizedExample(ids(tok, "long "), [M] * 5)
    assert truncated


def test_build_dataset_counts_truncated_records_and_loss_tokens(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "abcdefgh"},                         # 9 tokens -> cut to 6
        {"prompt": "pq", "completion": "r"},          # 4 tokens, loss on 2
        {"prompt": "long prompt", "completion": "x"},  # cut; no loss left, but kept
        CHAT,                                          # 60 tokens -> cut; loss on nothing within 6
    ])
    examples, stats = build_dataset(path, tok, max_length=6)
    assert stats == DatasetStats(num_records=4, num_examples=4, num_truncated=3, num_loss_tokens=6 + 2)
    assert [len(e.input_ids) for e in examples] == [6, 4, 6, 6]


# ------------------------------------------------------------------------------- very long records
class Spy:
    """The tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kwargs)


HUGE = 1_000_000


@pytest.mark.parametrize("record, expected_ids, expected_labels", [
    ({"text": "abcdefghij" * (HUGE // 10)}, "abcdefghij" * 4, "abcdefghij" * 4),
    ({"prompt": "p" * HUGE, "completion": "c"}, "p" * 40, None),
    ({"prompt": "Q:", "completion": "x" * HUGE}, "Q:" + "x" * 38, "  " + "x" * 38),
], ids=["text", "prompt", "completion"])
def test_a_huge_record_is_cut_before_tokenizing(tok, record, expected_ids, expected_labels):
    spy = Spy(tok)
    example, truncated = tokenize_record(record, spy, max_length=40)
    assert spy.longest <= CHARS_PER_TOKEN * 41  # not 1,000,000 characters
    assert truncated is True
    assert example.input_ids == ids(tok, expected_ids)  # the first 40 tokens of the whole text, no EOS
    labels = [M if c == " " else t for c, t in zip(expected_labels or "", ids(tok, expected_labels or ""))]
    assert example.labels == (labels if expected_labels else [M] * 40)


def test_a_huge_chat_turn_is_cut_before_rendering(tok):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * HUGE},
                           {"role": "user", "content": "z" * HUGE}, {"role": "assistant", "content": "w"}]}
    spy = Spy(tok)
    example, truncated = tokenize_record(record, spy, max_length=40)
    assert spy.longest < CHARS_PER_TOKEN * 41 + 100  # the budget plus the template's markup
    header = ids(tok, "<user>hi") + [EOS] + ids(tok, "<assistant>")  # 20 tokens
    assert truncated and example.input_ids == header + ids(tok, "y" * 20)
    assert example.labels == [M] * 20 + ids(tok, "y" * 20)


def word_tokenizer(word_length: int):
    """Whitespace-split words of ``word_length`` letters, one token each (vocabulary: 26 words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(97 + i) * word_length: i + 2 for i in range(26)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("word_length, exact, length", [(40, 16, 16), (63, 16, 16), (100, 10, 11)])
def test_long_tokens_still_fill_max_length_up_to_the_budget(word_length, exact, length):
    # The budget is 64 characters per token: tokens of up to 63 characters (+1 space) fill max_length
    # exactly as the whole text would. Longer ones give a shorter, still valid example: 10 whole
    # 100-character words fit in 64 * 17 characters, and the cut 11th word becomes another token.
    wt = word_tokenizer(word_length)
    text = " ".join(chr(97 + i % 26) * word_length for i in range(2000))
    example, truncated = tokenize_record({"text": text}, wt, max_length=16)
    whole = wt(text)["input_ids"]
    assert truncated and example.input_ids[:exact] == whole[:exact] and example.labels == example.input_ids
    assert len(example.input_ids) == length


def test_build_dataset_counts_a_cut_record_as_truncated(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"text": "x" * HUGE}, {"text": "cd"}])
    examples, stats = build_dataset(path, Spy(tok), max_length=8)
    assert stats == DatasetStats(num_records=3, num_examples=3, num_truncated=1, num_loss_tokens=3 + 8 + 3)
    assert examples[1].input_ids == ids(tok, "x" * 8)


# ----------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("max_length, chunks, truncated", [(64, [64, 18], 0), (10, [10, 10, 10], 2), (7, [7, 7, 7, 3], 2)])
def test_packing_cuts_the_concatenation_into_max_length_chunks(tok, tmp_path, max_length, chunks, truncated):
    # Records are truncated to max_length first (as without packing), then concatenated and re-cut.
    records = [{"text": "abcde"}, {"prompt": "xy", "completion": "z"}, {"text": "hello world"}, CHAT]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    plain, plain_stats = build_dataset(path, tok, max_length=max_length)
    packed, stats = build_dataset(path, tok, max_length=max_length, packing=True)
    assert [len(e.input_ids) for e in plain] == [min(n, max_length) for n in (6, 4, 12, 60)]
    assert [len(e.input_ids) for e in packed] == chunks
    assert [t for e in packed for t in e.input_ids] == [t for e in plain for t in e.input_ids]
    assert [t for e in packed for t in e.labels] == [t for e in plain for t in e.labels]
    assert stats == DatasetStats(num_records=4, num_examples=len(chunks), num_truncated=truncated,
                                 num_loss_tokens=plain_stats.num_loss_tokens)
    assert plain_stats.num_truncated == truncated
    if max_length == 64:
        assert plain_stats.num_loss_tokens == 6 + 2 + 12 + 3 + 5


def test_build_dataset_without_any_loss_token_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "long prompt", "completion": "x"}])
    with pytest.raises(ValueError, match=r"none of the 1 records has a token to train on.*max_length=3"):
        build_dataset(path, tok, max_length=3)


# ----------------------------------------------------------------------------------------- collate
def test_collate_right_pads_with_masks(tok):
    batch = collate([TokenizedExample([5, 6, 7], [M, 6, 7]), TokenizedExample([8], [8])], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (2, 3) and v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[M, 6, 7], [8, M, M]]


def test_collate_left_pads_when_asked():
    batch = collate([TokenizedExample([5, 6, 7], [M, 6, 7]), TokenizedExample([8], [8])], pad_token_id=0,
                    side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[M, 6, 7], [M, M, M]]  # 8 follows a pad: not a target


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_scores_the_same_targets_whatever_the_batch(side):
    """A text record's first token follows nothing: padded behind a longer record it is still not scored (it
    was, on the left, as predicted from the pad), so a record's scored targets do not depend on its batch."""
    examples = [TokenizedExample([5, 6, 7, 9], [5, 6, 7, 9]), TokenizedExample([8, 4], [8, 4]),
                TokenizedExample([3, 2, 1], [M, 2, 1])]
    together = collate(examples, pad_token_id=0, side=side)
    alone = [collate([e], pad_token_id=0, side=side) for e in examples]
    assert loss_tokens(together) == sum(loss_tokens(b) for b in alone) == 3 + 1 + 2
    targets = together["labels"][:, 1:]  # what each row's positions predict, as the causal-LM loss shifts them
    assert sorted(targets[targets != M].tolist()) == sorted([6, 7, 9, 4, 2, 1])


def test_collate_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty list of examples"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="side must be 'right' or 'left', got 'top'"):
        collate([TokenizedExample([5], [5])], pad_token_id=0, side="top")


# ------------------------------------------------------------------------------------- batch order
@pytest.mark.parametrize("group", [False, True])
def test_batch_order_is_deterministic_and_covers_every_index_once(group):
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    a = batch_order(lengths, 8, seed=3, epoch=1, group_by_length=group)
    assert a == batch_order(lengths, 8, seed=3, epoch=1, group_by_length=group)
    assert sorted(i for b in a for i in b) == list(range(1003))
    assert [len(b) for b in a] == [8] * 125 + [3]
    assert a != batch_order(lengths, 8, seed=3, epoch=2, group_by_length=group)
    assert a != batch_order(lengths, 8, seed=4, epoch=1, group_by_length=group)


def test_batch_order_without_grouping_is_the_seeded_permutation():
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 1_000_003 + 0)).tolist()
    assert batch_order([1] * 10, 4, seed=7, epoch=0, group_by_length=False) == [perm[:4], perm[4:8], perm[8:]]


def test_grouping_by_length_reduces_padding():
    lengths = [1 + (i * 7919) % 500 for i in range(800)]  # lengths 1..500, scrambled

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random = padding(batch_order(lengths, 4, seed=0, epoch=0, group_by_length=False))
    grouped = padding(batch_order(lengths, 4, seed=0, epoch=0, group_by_length=True))
    assert random > 100_000
    assert grouped < random / 20
    # Within a mega-chunk batches are sorted, so every batch spans a small length range.
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b)
               for b in batch_order(lengths, 4, seed=0, epoch=0, group_by_length=True)) < 40


def test_batch_order_edge_cases():
    assert batch_order([], 4, seed=0, epoch=0, group_by_length=True) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        batch_order([1, 2], 0, seed=0, epoch=0, group_by_length=False)


# -------------------------------------------------------------------------------------- read/errors
def test_read_records_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert read_records(path) == [{"text": "a"}, {"text": "b"}]


def test_records_are_streamed_one_line_at_a_time(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    records = iter_records(path)
    assert next(records) == {"text": "a"}  # read before the broken line 2 is reached
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        next(records)


def test_non_utf8_line_gives_its_line_number_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('\ufeff{"text": "a"}\n'.encode() + b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl: line 2 is not valid UTF-8 .*save the file as UTF-8"):
        read_records(path)
    path.write_bytes('\ufeff{"text": "a"}\n'.encode())
    assert read_records(path) == [{"text": "a"}]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'.*empty\.jsonl' is empty"):
        read_records(path)


def test_malformed_line_gives_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = ['{"text": "a"}'] * 6 + ['{"text": "a",}'] + ['{"text": "b"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 7 is not valid JSON \(.+\)"):
        read_records(path)


def test_line_that_is_not_an_object_gives_its_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 is a JSON list, not an object"):
        read_records(path)


def test_json_lines_in_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"text": "a"}, {"text": "b"}])
    assert read_records(path) == [{"text": "a"}, {"text": "b"}]


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<a/>", encoding="utf-8")
    with pytest.raises(ValueError, match=r"extension '\.xml', which is not supported"):
        read_records(path)


def test_unknown_shape_names_record_keys_and_shapes(tok, tmp_path):
    records = [{"text": "a"}] * 11 + [{"question": "q", "answer": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(ValueError, match=r"d\.jsonl: record 12 has keys \['answer', 'question'\].*"
                                         r"\{\"text\": str\}.*\"prompt\".*\"messages\""):
        build_dataset(path, tok, max_length=8)
    with pytest.raises(ValueError, match=r"record 3 has keys \['prompt'\]"):
        record_kind({"prompt": "only"}, 2)


def test_chat_without_assistant_names_the_record(tok):
    record = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValueError, match="record 5: the conversation has no 'assistant' message"):
        tokenize_record(record, tok, 16, index=4)


def test_chat_needs_a_chat_template(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="record 1 uses 'messages' but the tokenizer has no chat_template"):
        tokenize_record(CHAT, bare, 64)


@pytest.mark.parametrize("record, message", [
    ({"text": 5}, r"record 2: field 'text' must be a string, got int 5"),
    ({"prompt": "p", "completion": None}, r"record 2: field 'completion' must be a string, got NoneType"),
    ({"prompt": ["p"], "completion": "c"}, r"record 2: field 'prompt' must be a string, got list"),
    ({"messages": "hi"}, r"record 2: field 'messages' must be a non-empty list .*got str"),
    ({"messages": []}, r"record 2: field 'messages' must be a non-empty list .*got list"),
    ({"messages": ["hi"]}, r"record 2: messages\[0\] must be an object with 'role' and 'content', got str"),
    ({"messages": [{"content": "hi"}]}, r"record 2: messages\[0\]\.role must be a string \(it is missing\)"),
    ({"messages": [{"role": "assistant", "content": [1]}]},
     r"record 2: messages\[0\]\.content must be a string \(got list\)"),
])
def test_wrong_field_types_name_record_and_field(tok, record, message):
    with pytest.raises(ValueError, match=message):
        tokenize_record(record, tok, 16, index=1)


def test_bad_max_length(tok):
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        tokenize_record({"text": "a"}, tok, 0)


# ------------------------------------------------------------------------------- datasets formats
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")


@needs_datasets
def test_csv_with_a_text_column(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.csv"
    path.write_text("text,source\nab,x\ncd e,y\n", encoding="utf-8")
    assert read_records(path) == [{"text": "ab", "source": "x"}, {"text": "cd e", "source": "y"}]
    examples, stats = build_dataset(path, tok, max_length=16)
    assert [e.input_ids for e in examples] == [ids(tok, "ab") + [EOS], ids(tok, "cd e") + [EOS]]
    assert stats == DatasetStats(2, 2, 0, 3 + 5)


@needs_datasets
def test_json_array_goes_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]))
    assert read_records(path) == [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]


def test_non_jsonl_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    path = tmp_path / "d.csv"
    path.write_text("text\nab\n", encoding="utf-8")
    with pytest.raises(ImportError, match="pip install datasets"):
        read_records(path)
