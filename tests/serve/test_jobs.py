"""A request row's text release (xlora.serve.jobs): incremental detokenization equals decoding the whole answer."""

from __future__ import annotations

import threading

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xlora.serve.jobs import Job, RowState, TokenEvent
from xlora.serve.sampling import SamplingParams

TEXT = ("Café crème, naïve façade — 日本語のテキスト 🙂🧬 and plain ASCII words; "
        "Ωmega ∑ sums, ü ö ä ß, ελληνικά, العربية, 한국어 ✓✓✓ done.")


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose small vocabulary splits multi-byte characters over several tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT, "plain words and more plain words"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def _metaspace_bpe() -> PreTrainedTokenizerFast:
    """A SentencePiece-like tokenizer: words carry a leading '▁' that decodes to a space."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "</s>"])
    backend.train_from_iterator(["the cat sat on the mat", "plain words and more plain words"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def _release(tok, ids, **params) -> tuple[str, list[str], str | None]:
    """Push ``ids`` one by one through a row; the released pieces, their join and the finish reason."""
    events: list[TokenEvent] = []
    job = Job([1], SamplingParams(max_tokens=params.pop("max_tokens", len(ids)), temperature=0, **params),
              events.append)
    row = RowState(job, tok, threading.Lock(), {tok.eos_token_id}, device="cpu")
    reason = None
    for t in ids:
        reason = row.push(t, None)
        if reason:
            break
    pieces = [e.text for e in events]
    return "".join(pieces), pieces, reason


@pytest.mark.parametrize("make", [_byte_level_bpe, _metaspace_bpe])
def test_released_text_equals_the_whole_decode(make):
    tok = make()
    text = TEXT if make is _byte_level_bpe else "the cat sat on the mat and plain words"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 8
    joined, pieces, reason = _release(tok, ids)
    assert joined == tok.decode(ids, skip_special_tokens=True)
    assert reason == "length"
    assert all("\ufffd" not in p for p in pieces)  # a split character is held until it is complete
    if make is _byte_level_bpe:
        assert any(p == "" for p in pieces)  # ... which did happen: some tokens released nothing


def test_stop_string_split_over_tokens_is_found_and_trimmed():
    tok = _byte_level_bpe()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    full = tok.decode(ids)
    joined, _, reason = _release(tok, ids, stop=("🧬 and",))
    assert reason == "stop"
    assert joined == full[:full.index("🧬 and")]


def test_an_incomplete_character_at_the_length_limit_is_released_as_decoded():
    tok = _byte_level_bpe()
    ids = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the emoji must span several tokens for this test"
    joined, _, reason = _release(tok, ids[:-1], max_tokens=len(ids) - 1)
    assert reason == "length"
    assert joined == tok.decode(ids[:-1])  # what the whole decode gives, replacement character included


def test_release_decodes_a_bounded_window_per_token():
    tok = _byte_level_bpe()
    ids = tok(TEXT * 4, add_special_tokens=False)["input_ids"]
    decoded = []
    plain = tok.decode
    tok.decode = lambda token_ids, **kw: (decoded.append(len(token_ids)), plain(token_ids, **kw))[1]
    joined, _, _ = _release(tok, ids)
    tok.decode = plain
    assert joined == tok.decode(ids)
    # linear: each token re-decodes a few neighbours, never the whole answer (that would be ~n^2/2)
    assert sum(decoded) <= 8 * len(ids), (sum(decoded), len(ids))
