"""``scaling_pass_layers``: the scaling pass runs the first k decoder layers (and the final norm) only."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_head, tokens
from decoding import left_padded_batch, reference_greedy

from xlora import XLoraConfig, XLoraModel


def build(setup, k=None, seed=3, **cfg) -> XLoraModel:
    config = XLoraConfig(experts={n: str(p) for n, p in setup.expert_dirs.items()}, head_depth=2, head_hidden_size=16,
                         scaling_pass_layers=k, **cfg)
    model = XLoraModel(setup.base(), config).eval()
    randomize_head(model, seed, 0.7)
    return model


def test_all_layers_is_todays_model_exactly(llama):
    x = tokens()
    with torch.no_grad():
        ref = build(llama)(x)
        got = build(llama, k=2)(x)  # the tiny Llama has 2 layers: k = N
    assert torch.equal(got.logits, ref.logits) and torch.equal(got.scalings, ref.scalings)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_head_reads_the_normed_state_after_k_layers(setups, arch):
    model = build(setups[arch], k=1)
    x = tokens()
    base = setups[arch].base()
    with torch.no_grad():
        hidden = base(x, output_hidden_states=True).hidden_states[1]  # after the first block, before the norm
        norm = base.model.norm if arch == "llama" else base.transformer.ln_f
        want = model.head(norm(hidden))
        got = model(x).scalings
        full = build(setups[arch])(x).scalings
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - full).abs().max() > 1e-3  # a different model than k = N
    assert len(model.base_model.base_model.layers if arch == "llama" else model.base_model.transformer.h) == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_decoding_with_k_below_n_equals_full_recomputation(setups, arch):
    model = build(setups[arch], k=1)
    ids, mask = left_padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    ref_seq, ref_logits, _ = reference_greedy(model, ids, mask, 10)
    assert torch.equal(out.sequences, ref_seq)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    cache = model.new_cache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
    assert cache.scaling_cache.layers[0].get_seq_length() == 6 and cache.scaling_cache.layers[1].get_seq_length() == 0


def test_merged_caches_with_k_below_n(llama):
    model = build(llama, k=1)
    a, b = model.new_cache(), model.new_cache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), cache=a)
        model(input_ids=torch.tensor([[9, 10]]), cache=b)
    assert a.merge_rows(b) == (0, 2)
    assert a.scaling_cache.layers[0].keys.shape[0] == 2 and not a.scaling_cache.layers[1].is_initialized


def test_bad_k_is_refused_and_k_round_trips(llama, tmp_path):
    experts = {n: str(p) for n, p in llama.expert_dirs.items()}
    with pytest.raises(ValueError, match="scaling_pass_layers must be an integer >= 1, got 0"):
        XLoraConfig(experts=experts, scaling_pass_layers=0)
    with pytest.raises(ValueError, match=r"scaling_pass_layers=3 exceeds the base model's 2 decoder layers; use 1..2"):
        XLoraModel(llama.base(), XLoraConfig(experts=experts, scaling_pass_layers=3))
    model = build(llama, k=1)
    model.save_pretrained(tmp_path / "k1")
    loaded = XLoraModel.from_pretrained(tmp_path / "k1", base_model=llama.base()).eval()
    assert loaded.xlora_config.scaling_pass_layers == 1
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
