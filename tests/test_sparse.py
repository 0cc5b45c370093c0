"""Sparse top-k (gathered and grouped by expert) and folded prompt coefficients against the dense layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xlora import sparse
from xlora.adapters import LoraModuleWeights
from xlora.generation import StepRecorder
from xlora.layers import MixtureLoraLinear, ScalingState

IN, OUT, L = 12, 10, 3
RANKS = [3, 1, 5, 2]


def experts(num: int, skip: int | None = None) -> dict[int, LoraModuleWeights]:
    """``num`` experts of heterogeneous ranks (3, 1, 5, 2, 3, ...) and scales; ``skip`` adapts nothing here."""
    g = torch.Generator().manual_seed(num)
    return {e: LoraModuleWeights(A=0.3 * torch.randn(RANKS[e % 4], IN, generator=g),
                                 B=0.3 * torch.randn(OUT, RANKS[e % 4], generator=g), scale=0.5 + e / 10, dropout=0.0)
            for e in range(num) if e != skip}


def layer_of(num: int, skip: int | None = None, index: int = 1) -> tuple[MixtureLoraLinear, ScalingState]:
    torch.manual_seed(0)
    state = ScalingState()
    base = nn.Linear(IN, OUT).requires_grad_(False)
    return MixtureLoraLinear(base, index, num, experts(num, skip), state).eval(), state


def topk_scalings(b: int, t: int, num: int, k: int, seed: int, favour: int | None = None) -> torch.Tensor:
    """Softmax-like scalings with all but the ``k`` largest per token and layer zeroed (the head's top-k);
    expert ``favour`` is among them for the first token."""
    s = torch.rand(b, t, L, num, generator=torch.Generator().manual_seed(seed))
    if favour is not None:
        s[0, 0, :, favour] += 1.0
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)
    return s * keep


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Which sparse path each layer call took."""
    seen: list[str] = []
    for name in ("gathered", "grouped", "sliced"):
        real = getattr(sparse, name)
        monkeypatch.setattr(sparse, name, lambda *a, _real=real, _name=name: seen.append(_name) or _real(*a))
    return seen


# (experts, k, batch, length, path): up to SLICE_TOKENS tokens slice (one whatever E; several while the experts
# they chose are few); more tokens at E = 64 gather (reachable here with slicing off); at least E tokens group;
# the rest is dense
CASES = [(64, 2, 1, 1, "sliced"), (16, 2, 1, 1, "sliced"), (4, 2, 1, 1, "sliced"), (4, 1, 1, 1, "sliced"),
         (64, 2, 3, 1, "sliced"), (64, 2, 2, 2, "sliced"), (16, 1, 2, 1, "sliced"), (64, 1, 2, 1, "gathered"),
         (64, 2, 8, 1, None),
         (16, 2, 4, 4, "grouped"), (16, 2, 2, 9, "grouped"), (64, 4, 4, 16, "grouped"), (16, 1, 2, 8, "grouped"),
         (16, 2, 2, 7, None), (4, 2, 2, 9, None)]


@pytest.mark.parametrize(("num", "k", "b", "t", "path"), CASES)
@pytest.mark.parametrize("skip", [None, 5])
def test_top_k_paths_equal_the_dense_layer(num, k, b, t, path, skip, calls, monkeypatch):
    skip = skip if skip is not None and skip < num else None  # chosen for token 0, but no columns here
    if path == "gathered":
        monkeypatch.setattr(MixtureLoraLinear, "SLICE_TOKENS", 1)
    layer, state = layer_of(num, skip)
    x = torch.randn(b, t, IN, generator=torch.Generator().manual_seed(1))
    s = topk_scalings(b, t, num, k, seed=2, favour=skip)
    with state.use(scalings=s, global_weight=0.7):
        dense = layer(x)
    with state.use(scalings=s, global_weight=0.7, top_k=k):
        got = layer(x)
    assert calls == ([] if path is None else [path])
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5)  # outputs of size ~10: a few float32 ulps
    assert (dense - layer.base_layer(x)).abs().max() > 0.05  # the experts really contribute


@pytest.mark.parametrize(("pairs", "path"), [([(0, 9), (9, 0)], "sliced"), ([(0, 9), (2, 3)], None)])
def test_few_tokens_slice_only_while_the_experts_they_chose_are_few(pairs, path, calls):
    """Two tokens of sixteen experts, top-2: the same pair (2 experts, <= E/UNION_SHARE) slices, disjoint pairs
    (4) run dense; both equal the dense layer."""
    layer, state = layer_of(16)
    s = torch.zeros(1, 2, L, 16)
    for token, (e1, e2) in enumerate(pairs):
        s[0, token, :, e1], s[0, token, :, e2] = 0.7 - 0.1 * token, 0.3 + 0.1 * token
    x = torch.randn(1, 2, IN, generator=torch.Generator().manual_seed(13))
    with state.use(scalings=s):
        dense = layer(x)
    with state.use(scalings=s, top_k=2):
        got = layer(x)
        chosen = state.chosen_slices()[1]
    assert calls == ([] if path is None else [path])
    assert [e for _, e in chosen] == sorted({e for p in pairs for e in p})
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5)
    assert (dense - layer.base_layer(x)).abs().max() > 0.05


def test_chosen_is_computed_once_per_pass_and_holds_every_nonzero():
    state = ScalingState()
    s = torch.tensor([[[[0.0, 0.6, 0.0, 0.4], [0.0, 0.0, -2.0, 0.0]]]])  # [1, 1, 2, 4]
    with state.use(scalings=s, top_k=2):
        values, experts = state.chosen()
        assert state.chosen()[0] is values
        assert sorted(experts[0, 0, 0].tolist()) == [1, 3] and experts[0, 0, 1, 0].item() == 2
        assert values[0, 0, 1, 0].item() == -2.0
    assert state._chosen is None and state.top_k is None


def test_dropout_in_training_keeps_the_dense_path(calls):
    layer, state = layer_of(64)
    layer._no_dropout = False
    layer.train()
    with state.use(scalings=topk_scalings(1, 1, 64, 2, seed=3), top_k=2):
        layer(torch.randn(1, 1, IN))
    assert calls == []


@pytest.mark.parametrize("b", [1, 2])
def test_gradients_reach_the_chosen_scalings_through_the_sparse_paths(b, calls):
    """The head's top-k multiplies the unchosen scalings by 0, so only the chosen ones' gradients count."""
    layer, state = layer_of(16)
    x = torch.randn(b, 16 // b, IN, generator=torch.Generator().manual_seed(4))
    grads = []
    for top_k in (None, 2):
        s = topk_scalings(b, 16 // b, 16, 2, seed=5).requires_grad_(True)
        with state.use(scalings=s, top_k=top_k):
            layer(x).square().sum().backward()
        grads.append(s.grad[:, :, 1][s[:, :, 1] != 0])  # the layer reads layer 1's scalings
    assert calls == ["grouped"] and grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("num", "k", "b"), [(16, 2, 1), (16, 2, 3), (4, None, 1), (4, None, 3), (64, 3, 2)])
def test_folded_coefficients_equal_the_fixed_scalings(num, k, b):
    layer, state = layer_of(num, skip=2)
    s = torch.rand(b, L, num, generator=torch.Generator().manual_seed(6)) if k is None else \
        topk_scalings(b, 1, num, k, seed=6)[:, 0]  # [b, L, E]: a different choice per sequence
    folded = layer.fold(s, 0.35)
    x = torch.randn(b, 4, IN, generator=torch.Generator().manual_seed(7))
    with state.use(scalings=s.unsqueeze(1).expand(b, 4, L, num), global_weight=0.35):
        dense = layer(x)
    with state.use(scalings=s.unsqueeze(1).expand(b, 4, L, num), global_weight=0.35, folded=(None, folded, None)):
        got = layer(x)
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-6)
    ranks = {e: RANKS[e % 4] for e in range(num) if e != 2}
    if k is None:  # every column kept, B shared: A' = diag(c)·A per sequence
        assert folded.A.shape == (b, sum(ranks.values()), IN) and folded.B is layer.lora_B
    else:  # only the chosen experts' columns, as many as the sequence choosing the most
        kept = max(sum(ranks.get(int(e), 0) for e in (s[i, 1] != 0).nonzero()) for i in range(b))
        assert folded.A.shape == (b, kept, IN) and folded.B.shape == (b, OUT, kept)


def test_fold_of_zero_scalings_is_none_and_a_batch_mismatch_is_refused():
    layer, state = layer_of(4)
    assert layer.fold(torch.zeros(2, L, 4), 1.0) is None
    folded = layer.fold(torch.rand(2, L, 4), 1.0)
    with state.use(scalings=torch.rand(3, 1, L, 4), folded=(None, folded, None)), \
            pytest.raises(ValueError, match="folded experts hold 2 sequences but the input has shape \\(3, 1, 12\\)"):
        layer(torch.randn(3, 1, IN))
    picked = folded.rows(lambda t: t[[1, 1, 0]])
    assert torch.equal(picked.A[2], folded.A[0]) and picked.B is folded.B


@pytest.mark.parametrize("granularity", ["token", "prompt"])
@pytest.mark.parametrize("path", ["gathered", "grouped", "sliced", "sliced-batch"])
def test_top_k_generation_equals_the_dense_path(llama, monkeypatch, granularity, path, calls):
    """A top-2-of-3 head on the tiny Llama, left-padded batch of 3 with different choices per row: forcing
    each sparse path (the tiny model is below every threshold) gives the dense path's tokens and logits.
    ``sliced`` decodes the first row alone (one token per pass), ``sliced-batch`` all three (three per pass)."""
    from conftest import randomize_head
    from decoding import left_padded_batch

    from xlora import XLoraConfig, XLoraModel

    config = XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}, head_depth=2,
                         head_hidden_size=16, top_k=2, enable_softmax_topk=True)
    model = XLoraModel(llama.base(), config).eval()
    randomize_head(model, 5, 2.0)  # a router whose choice differs between the rows
    ids, mask = left_padded_batch(seed=3)
    if path == "sliced":
        ids, mask = ids[1:2, int((mask[1] == 0).sum()):], mask[1:2, int((mask[1] == 0).sum()):]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, granularity=granularity,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    monkeypatch.setattr(MixtureLoraLinear, "SLICE_TOKENS", 0)
    dense = model.generate(**kwargs)
    assert calls == []
    if path.startswith("sliced"):
        monkeypatch.setattr(MixtureLoraLinear, "SLICE_TOKENS", ids.shape[0])  # one decoding step, not the prompt
        monkeypatch.setattr(MixtureLoraLinear, "UNION_SHARE", 0)  # slice however many experts the rows chose
    else:
        monkeypatch.setattr(MixtureLoraLinear, "GATHER_SHARE", 0 if path == "gathered" else 10**9)
        monkeypatch.setattr(MixtureLoraLinear, "GROUP_SHARE", 0)
    recorder = StepRecorder()
    got = model.generate(**kwargs, observer=recorder)
    steps = 1 if granularity == "prompt" else 6  # prompt granularity decodes with the folded experts
    if path.startswith("sliced"):  # the prompt is more tokens (dense), prompt granularity folds: only token steps
        steps = 0 if granularity == "prompt" else 5
    assert set(calls) == ({path.split("-")[0]} if steps else set()) and len(calls) == steps * model.num_layers
    chosen = (torch.cat(recorder.steps, 1)[:, :, 0] != 0)  # [b, t, E]: each token's two experts (layer 0)
    assert chosen.sum(-1).eq(2).all()
    if path == "sliced":  # the single row changes its choice along the way
        assert len({tuple(r.tolist()) for r in chosen[0]}) > 1
    else:
        assert len({tuple(r.tolist()) for r in chosen[:, -1]}) > 1
    assert torch.equal(got.sequences, dense.sequences)
    for a, b in zip(got.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_one_token_with_gradients_to_the_scalings_does_not_slice(calls):
    """The sliced path reads the scalings as Python numbers, so a pass that trains the head must not take it."""
    layer, state = layer_of(64)
    x = torch.randn(1, 1, IN, generator=torch.Generator().manual_seed(8))
    grads = []
    for top_k in (None, 2):
        s = topk_scalings(1, 1, 64, 2, seed=9).requires_grad_(True)
        with state.use(scalings=s, top_k=top_k):
            layer(x).square().sum().backward()
        grads.append(s.grad[0, 0, 1][s[0, 0, 1] != 0])
    assert calls == ["gathered"] and grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)


def test_sliced_experts_in_another_dtype_than_the_base_output(calls):
    """Float32 experts on a float64 base layer: the chosen experts' sum is cast back to the base's dtype."""
    torch.manual_seed(0)
    state = ScalingState()
    base = nn.Linear(IN, OUT).double().requires_grad_(False)
    layer = MixtureLoraLinear(base, 1, 16, experts(16), state, dtype=torch.float32).eval()
    x = torch.randn(1, 1, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    s = topk_scalings(1, 1, 16, 2, seed=11)
    with state.use(scalings=s):
        dense = layer(x)
    with state.use(scalings=s, top_k=2):
        got = layer(x)
    assert calls == ["sliced"] and got.dtype == torch.float64
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5)
    assert (dense - base(x)).abs().max() > 0.05


def test_one_token_of_input_with_scalings_for_several_tokens_does_not_slice(calls):
    """An input of one token under scalings of several (e.g. a module past ``logits_to_keep``) must not quietly
    take the first token's scalings: the one-token path checks the scalings' shape, not only the input's."""
    layer, state = layer_of(64)
    with state.use(scalings=topk_scalings(1, 5, 64, 2, seed=12), top_k=2), \
            pytest.raises(ValueError, match=r"input of 1 tokens under scalings for 5"):
        layer(torch.randn(1, 1, IN))
    assert "sliced" not in calls


def test_sliced_fp16_experts_scale_before_the_up_projection(calls):
    """Float16 experts on a float32 base whose ``h·Bᵀ`` exceeds float16's range (~6.5e4) before the small
    scaling: the one-token path scales ``h`` first, as the dense path, and both stay finite and equal."""
    state = ScalingState()
    base = nn.Linear(IN, OUT).requires_grad_(False)
    big = {e: LoraModuleWeights(A=torch.full((2, IN), 20.0), B=torch.full((OUT, 2), 200.0), scale=1.0, dropout=0.0)
           for e in range(4)}  # h = 20·Σx per column; h·Bᵀ = 2·200·h ≈ 1e5 for Σx = 12
    layer = MixtureLoraLinear(base, 1, 4, big, state, dtype=torch.float16).eval()
    x = torch.ones(1, 1, IN)
    s = torch.zeros(1, 1, L, 4)
    s[..., 1], s[..., 3] = 1e-3, 2e-3  # two chosen experts
    with state.use(scalings=s):
        dense = layer(x)
    with state.use(scalings=s, top_k=2):
        got = layer(x)
    expected = base(x) + 3e-3 * 2 * 200 * 20 * IN  # g·Σ s·α/r · B·A·x, exactly
    assert calls == ["sliced"]
    torch.testing.assert_close(dense, expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)


# ------------------------------------------------------------------ scalings fixed by hand for every token, folded
def _hand_mix(L_: int, E: int) -> torch.Tensor:
    """An ``[L, E]`` mixture with one expert never used and every other layer all zero."""
    s = torch.rand(L_, E, generator=torch.Generator().manual_seed(4))
    s[:, 1] = 0
    s[::2] = 0
    return s


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", ["zero", "alpha", "gamma", "uniform", "mix"])
def test_scalings_fixed_for_every_token_fold_into_A_and_equal_the_dense_path(setups, arch, spec):
    """``[L, E]`` scalings at inference fold into each module's ``A`` over the columns they weight (none for the
    base, an expert's own ``r`` for one expert; uniform scalings, which skip nothing, stay dense): logits equal the dense path's (the same scalings per token,
    ``[b, t, L, E]``, which never folds) within 1e-5, and the base bit-identical to the adapters disabled."""
    from decoding import build, left_padded_batch

    model = build(setups[arch])
    ids, mask = left_padded_batch(seed=3)
    given = _hand_mix(model.num_layers, model.num_experts) if spec == "mix" else spec
    s = model.resolve_scalings(given)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, scalings=given).logits
        dense = model(input_ids=ids, attention_mask=mask, scalings=s.expand(*ids.shape, *s.shape).clone()).logits
        with model.disable_adapters():
            base = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-5)
    assert torch.equal(got, base) if spec == "zero" else (got - base).abs().max() > 1e-3
    folded = sparse.SharedFold().get(s, 1.0, model.mixture_layers, keep=False)
    if spec == "uniform":  # every expert weighted everywhere: nothing to skip, the dense path runs
        assert folded is None
        return
    for layer, f in zip(model.mixture_layers(), folded):
        cols = sum(r for e, r in zip(layer.expert_ids, layer.expert_ranks) if s[layer.layer_index, e] != 0)
        assert f is None if cols == 0 else f.A.shape == (cols, layer.in_features)


def test_a_fixed_scalings_context_folds_once_and_owns_its_scalings(llama, monkeypatch):
    """Inside ``fixed_scalings`` the fold is made once for all decoding steps (one ``fold`` per module for a
    6-token generation), from the context's own copy: changing the caller's tensor afterwards changes nothing.
    Leaving the context drops the fold. The greedy tokens equal the dense path's (per-sequence ``[b, L, E]``)."""
    from decoding import build, left_padded_batch

    model = build(llama)
    ids, mask = left_padded_batch(seed=3)
    s = _hand_mix(model.num_layers, model.num_experts)
    folds: list[int] = []
    real = MixtureLoraLinear.fold
    monkeypatch.setattr(MixtureLoraLinear, "fold", lambda self, *a: folds.append(1) or real(self, *a))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with model.fixed_scalings(s.unsqueeze(0).expand(3, -1, -1).clone()):  # [b, L, E]: never folded
        dense = model.generate(**kwargs)
    assert folds == []
    given = s.clone()
    with model.fixed_scalings(given):
        got = model.generate(**kwargs)
        given.mul_(0)
        with torch.no_grad():
            after = model(input_ids=ids, attention_mask=mask).logits
    assert len(folds) == model.num_layers
    # the greedy choice has a margin (top-2 gap >= 2e-3 on this seed) far above the paths' 1e-5: equal tokens on any CPU
    assert min(float((lg.topk(2).values[:, 0] - lg.topk(2).values[:, 1]).min()) for lg in dense.logits) > 1e-4
    assert torch.equal(got.sequences, dense.sequences)
    for a, b in zip(got.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(after, model(input_ids=ids, attention_mask=mask, scalings=s).logits, rtol=0, atol=0)
    assert len(folds) == 2 * model.num_layers  # a per-call [L, E] folds on every call
    with model.fixed_scalings(s), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(folds) == 3 * model.num_layers  # a new context folds anew


def test_fixed_scalings_with_gradients_or_in_training_do_not_fold(llama, monkeypatch):
    """Folding runs under ``no_grad`` at inference only: a gradient to hand-set scalings goes through the dense
    path and equals the per-token form's; in training mode (where experts may drop out) nothing folds either."""
    from decoding import build, left_padded_batch

    model = build(llama)
    ids, mask = left_padded_batch(seed=3)
    monkeypatch.setattr(MixtureLoraLinear, "fold", lambda *a: pytest.fail("folded"))
    with torch.no_grad():
        model.train()(input_ids=ids, attention_mask=mask, scalings="alpha")
    model.eval()
    grads = []
    for per_token in (False, True):
        s = _hand_mix(model.num_layers, model.num_experts).requires_grad_(True)
        given = s.expand(*ids.shape, *s.shape) if per_token else s
        model(input_ids=ids, attention_mask=mask, scalings=given).logits.square().mean().backward()
        grads.append(s.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
