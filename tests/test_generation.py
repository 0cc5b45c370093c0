"""Dual-cache decoding through generate(): exact against full recomputation, beams, sampling, streaming."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import VOCAB, randomize_head, tiny_tokenizer
from decoding import build, left_padded_batch, positions, reference_greedy
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from xlora import XLoraConfig, XLoraModel
from xlora.generation import StepRecorder, XLoraCache


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_equals_full_recomputation(setups, arch):
    model = build(setups[arch])
    ids, mask = left_padded_batch()
    steps = 12
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    ref_seq, ref_logits, _ = reference_greedy(model, ids, mask, steps)
    assert torch.equal(out.sequences, ref_seq)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"step {step}")
    # the mixture matters: the base model alone generates something else
    base_out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              scalings="zero", pad_token_id=0, eos_token_id=None)
    assert not torch.equal(base_out, out.sequences)


class ShapeSpy(XLoraModel):
    """Records the number of new tokens each scaling pass sees."""

    def scaling_pass(self, **inputs):
        ref = inputs.get("input_ids")
        self.seen.append(ref.shape[1])
        return super().scaling_pass(**inputs)


def test_decoding_never_recomputes_the_prefix(llama):
    model = ShapeSpy(llama.base(), XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}))
    model.eval()
    model.seen = []
    ids, mask = left_padded_batch()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    assert model.seen == [6] + [1] * 7
    model.seen = []
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                   eos_token_id=None, granularity="prompt")
    assert model.seen == [6]  # prompt granularity: one scaling pass over the prompt, then the main pass alone


def test_beam_search_equals_uncached_beam_search(llama):
    model = build(llama)
    ids, mask = left_padded_batch(seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
                  pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**kwargs)
    uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-4)


def test_sampling_is_reproducible_and_exact(llama):
    model = build(llama)
    ids, mask = left_padded_batch(seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8,
                  top_p=0.9, top_k=20, repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(1234)
        runs.append(model.generate(**kwargs, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])  # the cache changes nothing, even under sampling
    torch.manual_seed(99)
    assert not torch.equal(model.generate(**kwargs), runs[0])


def test_recorded_scalings_equal_full_forward(llama):
    model = build(llama)
    ids, mask = left_padded_batch(seed=4)
    recorder = StepRecorder()
    seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         observer=recorder, pad_token_id=0, eos_token_id=None)
    recorded = torch.cat(recorder.steps, dim=1)  # [b, prompt + 4, L, E]
    assert recorder.per_token(5, row=1).shape == (5, model.num_layers, model.num_experts)
    torch.testing.assert_close(recorder.per_token(5, row=1)[1:], recorded[1, ids.shape[1]:], rtol=0, atol=0)
    assert recorded.shape[1] == ids.shape[1] + 4  # the last new token is never fed back
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=seq[:, :-1], attention_mask=full_mask[:, :-1], position_ids=positions(full_mask[:, :-1]))
    real = full_mask[:, :-1].bool()
    torch.testing.assert_close(recorded[real], full.scalings[real], rtol=0, atol=1e-5)


def test_streamer_yields_the_generated_text(llama):
    model = build(llama)
    tok = tiny_tokenizer()
    enc = tok(["Hello there"], return_tensors="pt")
    full = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = tok.decode(full[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**enc, max_new_tokens=12, do_sample=False,
                                                                 pad_token_id=0, eos_token_id=None,
                                                                 streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected
    assert len(expected) > 0


def test_stopping_criteria_and_stop_strings(llama):
    model = build(llama)
    tok = tiny_tokenizer()
    enc = tok(["Hello there"], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    full = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    text = tok.decode(full[0, n:])

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= n + 3, dtype=torch.bool)

    short = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                           stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert torch.equal(short, full[:, : n + 3])
    stop = text[4:6]
    stopped = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                             stop_strings=[stop], tokenizer=tok)
    got = tok.decode(stopped[0, n:])
    assert got.endswith(stop) and text.startswith(got) and len(got) <= text.index(stop) + len(stop)


def test_unsupported_modes_raise_clear_errors(llama):
    model = build(llama)
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="observer= is not supported with num_beams > 1"):
        model.generate(input_ids=ids, attention_mask=mask, num_beams=2, observer=StepRecorder(), max_new_tokens=2)
    with pytest.raises(ValueError, match="use_cache=False recomputes every step without a cache: granularity='prompt'"):
        model.generate(input_ids=ids, attention_mask=mask, use_cache=False, granularity="prompt", max_new_tokens=2)
    with pytest.raises(ValueError, match="cache=DynamicCache: X-LoRA decodes with two caches"):
        model.generate(input_ids=ids, attention_mask=mask, cache=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="granularity must be 'token' or 'prompt', got 'word'"):
        model.generate(input_ids=ids, attention_mask=mask, granularity="word", max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", max_new_tokens=2)


def test_cache_operations_apply_to_both_caches(llama):
    model = build(llama)
    ids, mask = left_padded_batch()
    cache = model.new_cache(granularity="token")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), cache=cache)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 6
    cache.crop(-2)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 4
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == cache.scaling_cache.layers[0].keys.shape[0] == 6
    idx = torch.tensor([5, 0])
    before = cache.scaling_cache.layers[0].keys[idx].clone()
    cache.batch_select_indices(idx)
    assert torch.equal(cache.scaling_cache.layers[0].keys, before)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.scaling_cache.layers[0].keys[0], cache.scaling_cache.layers[0].keys[1])
    assert torch.equal(cache.layers[0].keys[0], cache.layers[0].keys[1])
    assert isinstance(cache, XLoraCache)


def test_merged_caches_decode_each_row_as_its_own_run(llama):
    """Two caches of different lengths merged (shorter one left-padded, masked): the next steps equal
    decoding every row alone, and recording caches are refused with a clear error."""
    model = build(llama)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, VOCAB, (1, 7), generator=g), torch.randint(3, VOCAB, (2, 3), generator=g)
    with torch.no_grad():
        ca, cb = model.new_cache(), model.new_cache()
        la = model(input_ids=a, cache=ca).logits[:, -1]
        lb = model(input_ids=b, cache=cb).logits[:, -1]
        pad_a, pad_b = ca.merge_rows(cb)
        assert (pad_a, pad_b) == (0, 4)
        assert ca.get_seq_length() == ca.scaling_cache.get_seq_length() == 7
        mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(2, 4), torch.ones(2, 3)], 1)]).long()
        seq = torch.cat([a.repeat(2, 1)[:1], torch.cat([torch.zeros(2, 4, dtype=torch.long), b], 1)])
        nxt = torch.cat([la, lb]).argmax(-1, keepdim=True)
        pos = torch.tensor([[7], [3], [3]])
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            seq = torch.cat([seq, nxt], 1)
            step = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=ca).logits[:, -1]
            for row, (start, _length) in enumerate([(0, 7), (4, 3), (4, 3)]):
                alone = model(input_ids=seq[row:row + 1, start:], use_cache=False).logits[0, -1]
                torch.testing.assert_close(step[row], alone, rtol=0, atol=1e-4)
            nxt, pos = step.argmax(-1, keepdim=True), pos + 1
    with pytest.raises(ValueError, match="different models or decoding modes"):
        prompt_mode = model.new_cache(granularity="prompt")
        prompt_mode.fixed_scalings = torch.zeros(1, 1, model.num_layers, model.num_experts)
        model.new_cache().merge_rows(prompt_mode)


def no_cache_base(setup):
    """The base as fine-tuned checkpoints often ship: ``use_cache: false`` in config and generation config."""
    base = setup.base()
    base.config.use_cache = False
    base.generation_config.use_cache = False
    return base


def test_a_use_cache_false_base_still_decodes_exactly_with_the_dual_cache(llama):
    config = XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}, head_depth=2, head_hidden_size=16)
    model = ShapeSpy(no_cache_base(llama), config).eval()
    randomize_head(model, 3, 0.7)
    model.seen = []
    ids, mask = left_padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert model.seen == [6] + [1] * 9  # the dual cache was used, not silently dropped
    ref_seq, ref_logits, _ = reference_greedy(model, ids, mask, 10)
    assert torch.equal(out.sequences, ref_seq)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"step {step}")
    # beams and seeded sampling: the cached run equals recomputation without a cache
    beams = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                 pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**beams), model.generate(**beams, use_cache=False))
    sample = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.9,
                  top_k=20, pad_token_id=0, eos_token_id=None)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(**sample, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])
    model.seen = []
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   eos_token_id=None, use_cache=False)
    assert model.seen == [6, 7, 8]  # use_cache=False from the caller: full recomputation at every step


def test_forward_with_a_cache_and_use_cache_false_is_refused(llama):
    model = build(llama)
    cache = model.new_cache()
    with pytest.raises(ValueError, match=r"forward\(cache=\.\.\., use_cache=False\) would leave the cache behind"):
        model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache, use_cache=False)
    assert cache.get_seq_length() == 0 and cache.scaling_cache.get_seq_length() == 0
