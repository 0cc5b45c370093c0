"""MixtureLoraLinear against an explicit per-expert loop; ScalingState; dropout; gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from xlora.adapters import LoraModuleWeights
from xlora.layers import ColumnTable, MixtureLoraLinear, ScalingState

IN, OUT, B, T = 12, 10, 2, 5


def base_layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(IN, OUT)
    else:
        layer = Conv1D(OUT, IN)  # weight [in, out]
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.3)
    layer.requires_grad_(False)
    return layer


def lora(rank: int, scale: float, seed: int, dropout: float = 0.0) -> LoraModuleWeights:
    g = torch.Generator().manual_seed(seed)
    # magnitudes of trained adapters: the expert terms are O(0.1-1), like the base output
    return LoraModuleWeights(A=0.3 * torch.randn(rank, IN, generator=g), B=0.3 * torch.randn(OUT, rank, generator=g),
                             scale=scale, dropout=dropout)


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def probs(*shape, seed: int) -> torch.Tensor:
    """Random scalings in [0, 1) (what a softmax head gives)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def reference(base: nn.Module, x, experts: dict[int, LoraModuleWeights], s, l: int, g: float = 1.0, drop=None):
    """``base(x) + g · Σ_e s[..., l, e] · scale_e · (drop_e(x) @ A_eᵀ) @ B_eᵀ``, one expert at a time."""
    y = base(x)
    for e, w in experts.items():
        xe = x if drop is None else drop(x, w.dropout)
        y = y + g * s[..., l, e : e + 1] * w.scale * ((xe @ w.A.T) @ w.B.T)
    return y


# Expert 1 adapts nothing here; experts 0, 2, 3 have ranks 3, 1, 5 and unrelated scales.
EXPERTS = {0: lora(3, 2.0, 1), 2: lora(1, 0.7, 2), 3: lora(5, 1 / 3, 3)}
E, L = 4, 3


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("layer_index", [0, 2])
@pytest.mark.parametrize("g", [1.0, 0.35])
def test_equals_per_expert_loop(kind, layer_index, g):
    state = ScalingState()
    base = base_layer(kind)
    layer = MixtureLoraLinear(base, layer_index, E, EXPERTS, state).eval()
    assert layer.lora_A.shape == (9, IN) and layer.lora_B.shape == (OUT, 9)
    assert layer.expert_ids == [0, 2, 3] and layer.expert_ranks == [3, 1, 5]
    x = rand(B, T, IN, seed=10)
    s = probs(B, T, L, E, seed=11)
    with state.use(scalings=s, global_weight=g):
        y = layer(x)
    ref = reference(base, x, EXPERTS, s, layer_index, g)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert (ref - base(x)).abs().max() > 0.1  # the experts really contribute


def test_layer_index_picks_its_slice():
    state = ScalingState()
    base = base_layer("linear")
    x = rand(B, T, IN, seed=10)
    s = torch.zeros(B, T, L, E)
    s[:, :, 1] = probs(B, T, E, seed=12)  # only layer 1 has non-zero scalings
    outs = []
    for l in range(L):
        layer = MixtureLoraLinear(base, l, E, EXPERTS, state).eval()
        with state.use(scalings=s):
            outs.append(layer(x))
    assert torch.equal(outs[0], base(x)) and torch.equal(outs[2], base(x))
    torch.testing.assert_close(outs[1], reference(base, x, EXPERTS, s, 1), rtol=0, atol=1e-6)
    assert (outs[1] - base(x)).abs().max() > 0.1


def test_expert_that_does_not_adapt_the_module_contributes_nothing():
    state = ScalingState()
    base = base_layer("linear")
    layer = MixtureLoraLinear(base, 0, E, EXPERTS, state).eval()
    x = rand(B, T, IN, seed=10)
    s = probs(B, T, L, E, seed=11)
    with state.use(scalings=s):
        y = layer(x)
    s2 = s.clone()
    s2[..., 1] = 1e6  # expert 1 has no columns here
    with state.use(scalings=s2):
        assert torch.equal(layer(x), y)
    only1 = torch.zeros_like(s)
    only1[..., 1] = 1.0
    with state.use(scalings=only1):
        assert torch.equal(layer(x), base(x))


def test_uniform_ranks_single_expert_and_all_experts():
    state = ScalingState()
    base = base_layer("conv1d")
    experts = {0: lora(2, 1.5, 4), 1: lora(2, 0.25, 5), 2: lora(2, 3.0, 6)}  # uniform ranks, all experts
    layer = MixtureLoraLinear(base, 1, 3, experts, state).eval()
    assert layer.all_experts and layer.uniform_rank
    x = rand(B, T, IN, seed=20)
    s = probs(B, T, 2, 3, seed=21)
    with state.use(scalings=s, global_weight=2.0):
        torch.testing.assert_close(layer(x), reference(base, x, experts, s, 1, 2.0), rtol=0, atol=1e-6)
    one = {2: lora(4, 0.5, 7)}
    layer = MixtureLoraLinear(base, 0, 3, one, state).eval()
    with state.use(scalings=s):
        torch.testing.assert_close(layer(x), reference(base, x, one, s, 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_constant_scaling(kind):
    state = ScalingState()
    base = base_layer(kind)
    layer = MixtureLoraLinear(base, 1, E, EXPERTS, state).eval()
    x = rand(B, T, IN, seed=10)
    c, g = 0.3, 1.7
    with state.use(constant=c, global_weight=g):
        y = layer(x)
    s = torch.full((B, T, L, E), c)
    torch.testing.assert_close(y, reference(base, x, EXPERTS, s, 1, g), rtol=0, atol=1e-6)


def test_column_table_coefficients_equal_per_layer_path():
    state = ScalingState()
    base = base_layer("linear")
    layers = [
        MixtureLoraLinear(base, 0, E, EXPERTS, state).eval(),
        MixtureLoraLinear(base, 1, E, {1: lora(2, 0.5, 8)}, state).eval(),
        MixtureLoraLinear(base, 2, E, {0: lora(4, 1.0, 9), 3: lora(4, 2.0, 10)}, state).eval(),
    ]
    table = ColumnTable(layers)
    assert table.expert.shape == (3, 9)
    x = rand(B, T, IN, seed=10)
    s = probs(B, T, L, E, seed=11)
    g = 0.6
    for layer in layers:
        with state.use(scalings=s, global_weight=g):
            plain = layer(x)
        with state.use(scalings=s, global_weight=g, coefficients=table.coefficients(s, g)):
            fused = layer(x)
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
        experts = {e: LoraModuleWeights(A, B_, 0.0, 0.0) for e, (A, B_) in layer.expert_weights().items()}
        scales = dict(zip(layer.expert_ids, layer.col_scale.split(layer.expert_ranks)))
        for e in experts:
            experts[e].scale = float(scales[e][0])
        torch.testing.assert_close(fused, reference(base, x, experts, s, layer.layer_index, g), rtol=0, atol=1e-6)


def test_column_table_is_skipped_for_large_inputs_only_when_ranks_are_uniform(monkeypatch):
    state = ScalingState()
    base = base_layer("linear")
    uniform = [MixtureLoraLinear(base, l, 2, {0: lora(2, 1.0, 1 + l), 1: lora(2, 0.5, 3 + l)}, state) for l in range(2)]
    mixed = [uniform[0], MixtureLoraLinear(base, 1, 2, {0: lora(3, 0.5, 8), 1: lora(1, 2.0, 9)}, state)]  # ranks 3, 1
    assert ColumnTable(uniform).uniform_ranks and not ColumnTable(mixed).uniform_ranks
    s = probs(B, T, 2, 2, seed=3)
    monkeypatch.setattr(ColumnTable, "MAX_TABLE", B * T * 2 * 4)  # exactly this input fits: L = 2 layers, R = 4 columns
    table = ColumnTable(uniform).coefficients(s, 0.7)
    assert len(table) == 2 and all(c.shape == (B, T, 4) for c in table)
    monkeypatch.setattr(ColumnTable, "MAX_TABLE", B * T * 2 * 4 - 1)
    assert ColumnTable(uniform).coefficients(s, 0.7) is None  # the layers weight h per expert instead
    kept = ColumnTable(mixed).coefficients(s, 0.7)  # a mixed-rank layer keeps the table: one view per layer
    assert len(kept) == 2 and all(c.shape == (B, T, 4) for c in kept)
    x = rand(B, T, IN, seed=4)
    for layer in uniform:  # both paths give the same bits
        with state.use(scalings=s, global_weight=0.7):
            view = layer(x)
        with state.use(scalings=s, global_weight=0.7, coefficients=table):
            assert torch.equal(layer(x), view)


def nan_layer(kind: str, state: ScalingState) -> MixtureLoraLinear:
    layer = MixtureLoraLinear(base_layer(kind), 0, E, EXPERTS, state).eval()
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))
        layer.lora_B.fill_(float("nan"))
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_no_scalings_or_constant_zero_is_exactly_base_and_skips_matmuls(kind):
    state = ScalingState()
    layer = nan_layer(kind, state)
    x = rand(B, T, IN, seed=10)
    ref = layer.base_layer(x)
    assert torch.equal(layer(x), ref)  # no state at all
    with state.use(constant=0.0, global_weight=1.0):
        assert torch.equal(layer(x), ref)  # the scaling pass (scaling_pass_value=0)
    with state.use(scalings=None, constant=None):
        assert torch.equal(layer(x), ref)
    with state.use(constant=0.5):  # the NaNs are reached as soon as scalings are non-zero
        assert torch.isnan(layer(x)).all()


def test_all_zero_scalings_tensor_equals_base_exactly():
    state = ScalingState()
    layer = MixtureLoraLinear(base_layer("linear"), 2, E, EXPERTS, state).eval()
    x = rand(B, T, IN, seed=10)
    with state.use(scalings=torch.zeros(B, T, L, E)):
        assert torch.equal(layer(x), layer.base_layer(x))
    with state.use(scalings=probs(B, T, L, E, seed=3), global_weight=0.0):
        assert torch.equal(layer(x), layer.base_layer(x))


def test_scaling_state_use_restores_previous_state_even_on_error():
    state = ScalingState()
    s1, c1 = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    with state.use(scalings=s1, global_weight=0.5, coefficients=c1):
        with pytest.raises(RuntimeError, match="boom"):
            with state.use(constant=0.25, global_weight=3.0):
                assert (state.scalings, state.constant, state.global_weight, state.coefficients) == (None, 0.25, 3.0, None)
                raise RuntimeError("boom")
        assert state.scalings is s1 and state.coefficients is c1
        assert (state.constant, state.global_weight) == (None, 0.5)
    assert (state.scalings, state.constant, state.global_weight, state.coefficients) == (None, None, 1.0, None)


@pytest.mark.parametrize("trainable", [True, False])
def test_gradients_reach_lora_only_when_trainable(trainable):
    state = ScalingState()
    base = base_layer("linear")
    layer = MixtureLoraLinear(base, 1, E, EXPERTS, state, trainable=trainable).eval()
    x = rand(B, T, IN, seed=10).requires_grad_()
    s = probs(B, T, L, E, seed=11)
    with state.use(scalings=s, global_weight=0.8):
        (layer(x) ** 2).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == (["lora_A", "lora_B"] if trainable else [])
    assert base.weight.grad is None and base.bias.grad is None
    # reference gradients from the explicit loop with leaf A_e, B_e
    leaves = {e: LoraModuleWeights(w.A.clone().requires_grad_(), w.B.clone().requires_grad_(), w.scale, 0.0)
              for e, w in EXPERTS.items()}
    xr = x.detach().clone().requires_grad_()
    (reference(base, xr, leaves, s, 1, 0.8) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)  # input grads flow either way
    if trainable:
        torch.testing.assert_close(layer.lora_A.grad, torch.cat([leaves[e].A.grad for e in (0, 2, 3)]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, torch.cat([leaves[e].B.grad for e in (0, 2, 3)], 1),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert layer.lora_A.grad is None and layer.lora_B.grad is None


def test_dropout_in_training_differs_but_eval_equals_reference():
    torch.manual_seed(0)
    state = ScalingState()
    base = base_layer("linear")
    experts = {e: LoraModuleWeights(w.A, w.B, w.scale, 0.3) for e, w in EXPERTS.items()}
    layer = MixtureLoraLinear(base, 0, E, experts, state)
    x = rand(B, T, IN, seed=10)
    s = probs(B, T, L, E, seed=11)
    with state.use(scalings=s):
        layer.train()
        y1, y2 = layer(x), layer(x)
        layer.eval()
        y3 = layer(x)
    assert (y1 - y2).abs().max() > 1e-2
    torch.testing.assert_close(y3, reference(base, x, experts, s, 0), rtol=0, atol=1e-6)


def fake_dropout_masks():
    """A deterministic stand-in for F.dropout: a fixed keep-mask per probability, scaled by 1/(1-p); the
    same mask, element for element, whether ``x`` comes as ``[b, t, in]`` or flattened to ``[b·t, in]``."""
    masks: dict[float, torch.Tensor] = {}

    def drop(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        if p not in masks:
            g = torch.Generator().manual_seed(int(p * 1e6))
            masks[p] = (torch.rand(x.numel(), generator=g) >= p).to(x.dtype)
        return x * masks[p].view(x.shape) / (1 - p)

    return drop


def test_per_expert_dropout_groups_match_reference(monkeypatch):
    state = ScalingState()
    base = base_layer("conv1d")
    experts = {0: lora(3, 2.0, 1, dropout=0.0), 2: lora(1, 0.7, 2, dropout=0.5), 3: lora(5, 1 / 3, 3, dropout=0.25)}
    layer = MixtureLoraLinear(base, 1, E, experts, state).train()
    assert [p for p, _ in layer._dropout_groups] == [0.0, 0.25, 0.5]
    drop = fake_dropout_masks()
    monkeypatch.setattr(F, "dropout", drop)
    x = rand(B, T, IN, seed=10)
    s = probs(B, T, L, E, seed=11)
    with state.use(scalings=s, global_weight=0.9):
        y = layer(x)
    ref = reference(base, x, experts, s, 1, 0.9, drop=drop)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    # and that is not what one shared mask would give
    shared = reference(base, x, experts, s, 1, 0.9, drop=lambda x, p: drop(x, 0.5))
    assert (y - shared).abs().max() > 1e-2


def test_undropped_expert_survives_next_to_a_heavily_dropped_one():
    torch.manual_seed(0)
    state = ScalingState()
    base = base_layer("linear")
    keep, drop = lora(3, 2.0, 1, dropout=0.0), lora(2, 1.0, 2, dropout=0.999)
    layer = MixtureLoraLinear(base, 0, 2, {0: keep, 1: drop}, state).train()
    x = rand(B, T, IN, seed=10)
    s = torch.zeros(B, T, 1, 2)
    s[..., 0] = 1.0  # only the undropped expert counts
    with state.use(scalings=s):
        y = layer(x)
    expected = base(x) + 2.0 * (x @ keep.A.T) @ keep.B.T
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    # the heavily dropped expert alone: almost every input element is zeroed (≤ 3 of 120 survive here)
    s = torch.zeros(B, T, 1, 2)
    s[..., 1] = 1.0
    torch.manual_seed(1)
    with state.use(scalings=s):
        delta = layer(x) - base(x)
    torch.manual_seed(1)
    kept = F.dropout(torch.ones(B, T, IN), 0.999, True) != 0  # the same mask, replayed
    assert int(kept.sum()) <= 3
    torch.testing.assert_close(delta, ((x * kept / 0.001) @ drop.A.T) @ drop.B.T, rtol=1e-4, atol=1e-3)


def test_dtype_and_device_follow_the_base_layer():
    state = ScalingState()
    base = base_layer("linear").to(torch.float64)
    layer = MixtureLoraLinear(base, 0, E, EXPERTS, state).eval()
    assert layer.lora_A.dtype == torch.float64 and layer.col_scale.dtype == torch.float64
    x = rand(B, T, IN, seed=10).double()
    s = probs(B, T, L, E, seed=11)  # float32 scalings are cast
    with state.use(scalings=s):
        y = layer(x)
    assert y.dtype == torch.float64
    ref = reference(base, x, {e: LoraModuleWeights(w.A.double(), w.B.double(), w.scale, 0.0) for e, w in EXPERTS.items()},
                    s.double(), 0)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)  # α/r is not rounded to float32 on the way
    table = ColumnTable([layer])
    assert table.scale.dtype == torch.float64
    with state.use(scalings=s, coefficients=table.coefficients(s, 1.0)):
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)


def test_expert_weights_split_back_out():
    layer = MixtureLoraLinear(base_layer("linear"), 0, E, EXPERTS, ScalingState())
    got = layer.expert_weights()
    assert list(got) == [0, 2, 3]
    for e, (A, B_) in got.items():
        assert torch.equal(A, EXPERTS[e].A) and torch.equal(B_, EXPERTS[e].B)
    assert layer.col_scale.tolist() == pytest.approx([2.0] * 3 + [0.7] + [1 / 3] * 5, abs=1e-7)
    assert layer.col_expert.tolist() == [0, 0, 0, 2, 3, 3, 3, 3, 3]
