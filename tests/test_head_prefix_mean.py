"""``head_prefix_mean``: the head reads ``[h_t ; mean_{s<=t} h_s]`` (xlora.head.PrefixMeans); exact under the dual
cache, its cache operations, padding, saving, and the formats that cannot hold it."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tokens
from decoding import build, left_padded_batch, positions, reference_greedy

from xlora import XLoraConfig, XLoraModel
from xlora.head import PrefixMeans


def model_for(setup, k=1, **cfg) -> XLoraModel:
    return build(setup, head_prefix_mean=True, scaling_pass_layers=k, **cfg)


def test_the_head_reads_the_state_and_the_mean_of_the_real_states_so_far(llama):
    model = model_for(llama)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).scalings
        h = model.scaling_pass(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    assert model.head.layers[0].in_features == 2 * h.shape[-1]
    for row in range(3):
        start = int((mask[row] == 0).sum())  # left padding
        for t in range(start, ids.shape[1]):
            x = torch.cat([h[row, t], h[row, start:t + 1].mean(0)])[None, None]
            torch.testing.assert_close(got[row, t], model.head(x)[0, 0], rtol=0, atol=1e-6)
    # the same prompt alone (no padding) gets the same scalings: padding adds nothing to the mean
    with torch.no_grad():
        alone = model(input_ids=ids[2:, 4:]).scalings
    torch.testing.assert_close(alone[0], got[2, 4:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_equals_full_recomputation(setups, arch):
    model = model_for(setups[arch])
    ids, mask = left_padded_batch(seed=3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    ref_seq, ref_logits, _ = reference_greedy(model, ids, mask, 10)
    assert torch.equal(out.sequences, ref_seq)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"step {step}")
    plain = build(setups[arch], scaling_pass_layers=1)  # same seed, the head without the mean: another model
    x = tokens()
    with torch.no_grad():
        assert (plain(x).scalings - model(x).scalings).abs().max() > 1e-3


def test_beams_and_sampling_equal_uncached_decoding(llama):
    model = model_for(llama)
    ids, mask = left_padded_batch(seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                  pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    cached, uncached = model.generate(**kwargs), model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-4)
    sample = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.9,
                  pad_token_id=0, eos_token_id=None, num_return_sequences=2)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(**sample, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


def test_a_cropped_cache_continues_as_if_the_tokens_were_never_seen(llama):
    model = model_for(llama)
    x = tokens(batch=1, seq=9, seed=4)
    with torch.no_grad():
        cache = model.new_cache()
        model(input_ids=x[:, :7], cache=cache)
        assert cache.prefix.sums.shape[1] == cache.scaling_cache.get_seq_length() == 7
        cache.crop(-3)
        assert cache.prefix.sums.shape[1] == 4 and cache.prefix.counts[0, -1] == 4
        step = model(input_ids=x[:, 4:9], cache=cache, position_ids=torch.arange(4, 9)[None])
        full = model(input_ids=x)
    torch.testing.assert_close(step.scalings, full.scalings[:, 4:], rtol=0, atol=1e-5)
    torch.testing.assert_close(step.logits, full.logits[:, 4:], rtol=0, atol=1e-4)


def test_merged_caches_decode_each_row_as_its_own_run(llama):
    model = model_for(llama)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, VOCAB, (1, 7), generator=g), torch.randint(3, VOCAB, (2, 3), generator=g)
    with torch.no_grad():
        ca, cb = model.new_cache(), model.new_cache()
        nxt = torch.cat([model(input_ids=a, cache=ca).logits[:, -1], model(input_ids=b, cache=cb).logits[:, -1]])
        assert ca.merge_rows(cb) == (0, 4) and ca.prefix.sums.shape[:2] == (3, 7)
        mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(2, 4), torch.ones(2, 3)], 1)]).long()
        seq = torch.cat([a, torch.cat([torch.zeros(2, 4, dtype=torch.long), b], 1)])
        nxt, pos = nxt.argmax(-1, keepdim=True), torch.tensor([[7], [3], [3]])
        for _ in range(3):
            mask, seq = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1), torch.cat([seq, nxt], 1)
            step = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=ca)
            for row, start in enumerate([0, 4, 4]):
                alone = model(input_ids=seq[row:row + 1, start:], use_cache=False)
                torch.testing.assert_close(step.scalings[row, -1], alone.scalings[0, -1], rtol=0, atol=1e-5)
                torch.testing.assert_close(step.logits[row, -1], alone.logits[0, -1], rtol=0, atol=1e-4)
            nxt, pos = step.logits[:, -1].argmax(-1, keepdim=True), pos + 1


def test_running_means_refuse_another_batch_and_a_lone_merge():
    p = PrefixMeans()
    p.extend(torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match="hold 2 sequences but the input 3: start a new cache"):
        p.extend(torch.randn(3, 1, 4), None)
    with pytest.raises(ValueError, match="only one cache holds running means"):
        p.merge(PrefixMeans(), 3)


def test_saved_and_loaded_bit_exactly_and_refused_by_the_other_formats(llama, tmp_path):
    model = model_for(llama, k=None)
    model.save_pretrained(tmp_path / "m")
    back = XLoraModel.from_pretrained(tmp_path / "m", base_model=llama.base()).eval()
    assert back.xlora_config.head_prefix_mean is True
    for name, t in model.head.state_dict().items():
        assert torch.equal(back.head.state_dict()[name], t), name
    x = tokens()
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    for fmt, who in (("peft", "PEFT"), ("original", "the original xlora package"), ("mistralrs", "mistral.rs")):
        with pytest.raises(ValueError, match=f"{who}'s X-LoRA head reads each position's state alone.*head_prefix_mean"):
            model.save_pretrained(tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()


def test_a_bad_value_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"head_prefix_mean must be true or false, got 'yes'"):
        XLoraConfig(experts={"a": "x"}, head_prefix_mean="yes")
