"""Prompt granularity: one mixture per sequence from the prompt's scalings, folded into A with a top-k head."""

from __future__ import annotations

import pytest
import torch
from decoding import build, left_padded_batch, positions, reference_greedy

from xlora.generation import reduce_prompt_scalings


@pytest.mark.parametrize("how", ["last", "mean"])
def test_prompt_granularity(llama, how):
    model = build(llama)
    ids, mask = left_padded_batch(seed=3)
    steps = 8
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         granularity="prompt", prompt_scalings=how, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    token = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.sequences[:, : ids.shape[1] + 1], token)
    # its own no-cache reference: per-token scalings over the prompt, then the reduced ones held fixed
    with torch.no_grad():
        prompt_s = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).scalings
    fixed = reduce_prompt_scalings(prompt_s, mask, how)

    def scalings_for(length: int) -> torch.Tensor:
        return torch.cat([prompt_s, fixed.expand(-1, length - ids.shape[1], -1, -1)], 1)

    ref_seq, ref_logits, _ = reference_greedy(model, ids, mask, steps, scalings_for)
    assert torch.equal(out.sequences, ref_seq)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("top_k", [None, 1])
def test_prompt_granularity_folds_the_chosen_experts_into_A_once_with_top_k(llama, top_k):
    """With a top-k head, decoding steps use A' = diag(c)·A per sequence over the chosen experts' columns only;
    a dense head keeps the shared A (folding measured no faster); both as exact as the fixed-scalings path."""
    model = build(llama, top_k=top_k, enable_softmax_topk=top_k is not None)
    ids, mask = left_padded_batch(seed=3)
    cache = model.new_cache(granularity="prompt", prompt_scalings="last")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache=cache,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    layers = model.mixture_layers()
    fixed = cache.fixed_scalings  # [3, 1, L, E]
    if top_k is None:
        assert cache.folded is None
    else:
        assert len(cache.folded) == model.num_layers == len(layers)
        assert int((fixed != 0).sum(-1).max()) == 1  # the last prompt token's top-1: one expert per sequence
        g = model.xlora_config.global_scaling_weight
        dropped = 0
        for f, layer in zip(cache.folded, layers):  # [b, R', in]: R' the most nonzero columns of a sequence
            kept_cols = int((layer._column_coefficients(fixed, g)[:, 0] != 0).sum(-1).max())
            if kept_cols == 0:  # no chosen expert adapts this module: nothing to compute
                assert f is None
                continue
            assert f.A.shape == (3, kept_cols, layer.lora_A.shape[1])
            dropped += layer.lora_A.shape[0] - kept_cols
        assert dropped > 0  # the unchosen experts' columns are not computed
        i = next(i for i, f in enumerate(cache.folded) if f is not None)
        coef = layers[i]._column_coefficients(fixed[1:2], g)[0, 0]  # [R]
        kept = coef != 0
        torch.testing.assert_close(cache.folded[i].A[1, :int(kept.sum())], coef[kept, None] * layers[i].lora_A[kept],
                                   rtol=0, atol=0)
    with torch.no_grad():
        prompt_s = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).scalings

    def scalings_for(length: int) -> torch.Tensor:
        return torch.cat([prompt_s, fixed.expand(-1, length - ids.shape[1], -1, -1)], 1)

    ref_seq, ref_logits, _ = reference_greedy(model, ids, mask, 6, scalings_for)
    assert torch.equal(out.sequences, ref_seq)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if top_k is not None:
        rows = cache.folded[i].A.clone()
        cache.batch_select_indices(torch.tensor([2, 0]))  # the cache operations move the folded rows too
        assert torch.equal(cache.folded[i].A, rows[[2, 0]])
    cache.reset()
    assert cache.folded is None and cache.fixed_scalings is None


def test_reduce_prompt_scalings_by_hand():
    s = torch.arange(2 * 3 * 1 * 2, dtype=torch.float).reshape(2, 3, 1, 2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    last = reduce_prompt_scalings(s, mask, "last")
    assert last[:, 0, 0].tolist() == [[4.0, 5.0], [8.0, 9.0]]
    mean = reduce_prompt_scalings(s, mask, "mean")
    assert mean[:, 0, 0].tolist() == [[3.0, 4.0], [7.0, 8.0]]
