"""ScalingHead: MLP layout, shapes, softmax with temperature, top-k and re-softmax, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xlora import XLoraConfig
from xlora.head import ScalingHead

NAMES = ["a", "b", "c", "d"]


def head(num_experts: int = 4, hidden: int = 4, num_layers: int = 3, **cfg) -> ScalingHead:
    cfg.setdefault("head_hidden_size", 8)
    config = XLoraConfig(experts={n: f"./{n}" for n in NAMES[:num_experts]}, **cfg)
    return ScalingHead(config, hidden, num_layers, num_experts).eval().requires_grad_(False)


def identity_head(**cfg) -> ScalingHead:
    """Depth 1 with weight I and bias 0: the logits are the hidden state itself."""
    h = head(**cfg)
    lin = h.layers[0]
    with torch.no_grad():
        lin.weight.copy_(torch.eye(*lin.weight.shape))
        if lin.bias is not None:
            lin.bias.zero_()
    return h


# one token's logits, no ties; a second token with a different order
Z = torch.tensor([[[2.0, -1.0, 0.5, 1.0], [0.1, 3.0, -2.0, 0.2]]])  # [b=1, t=2, E=4]


def softmax_by_hand(values: list[float], T: float = 1.0) -> list[float]:
    ex = [math.exp(v / T) for v in values]
    return [e / sum(ex) for e in ex]


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("num_layers, num_experts", [(1, 1), (3, 2), (5, 4)])
def test_shapes(layerwise, num_layers, num_experts):
    torch.manual_seed(0)
    h = head(num_experts=num_experts, hidden=6, num_layers=num_layers, layerwise_scalings=layerwise, head_depth=2)
    assert h.layers[-1].out_features == num_experts * (num_layers if layerwise else 1)
    s = h(torch.randn(2, 7, 6))
    assert s.shape == (2, 7, num_layers, num_experts)
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 7, num_layers))  # softmax over E


def count(seq: nn.Sequential) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in seq:
        out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu_dropout", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mlp_layout(depth, bias, relu_dropout, dropout):
    h = head(hidden=6, head_depth=depth, head_bias=bias, head_relu_dropout=relu_dropout, head_dropout=dropout,
             head_hidden_size=9)
    expected = {"Linear": depth}
    if relu_dropout and depth > 1:
        expected["ReLU"] = depth - 1
        if dropout > 0:
            expected["Dropout"] = depth - 1
    assert count(h.layers) == expected
    linears = [m for m in h.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 9)] * (depth > 1) + [(9, 9)] * max(depth - 2, 0) + [
        (9 if depth > 1 else 6, 4)
    ]
    assert all((m.bias is not None) == bias for m in linears)
    assert all(m.p == dropout for m in h.layers if isinstance(m, nn.Dropout))
    # the order within a hidden block is Linear, ReLU, Dropout
    if relu_dropout and depth > 1:
        names = [type(m).__name__ for m in h.layers]
        block = ["Linear", "ReLU"] + (["Dropout"] if dropout > 0 else [])
        assert names == block * (depth - 1) + ["Linear"]
    # parameter names follow PEFT's XLoraClassifier.layers: 'layers.<index in the Sequential>.weight/bias'
    step = (1 + relu_dropout + (relu_dropout and dropout > 0)) if depth > 1 else 1
    expected_keys = [f"layers.{i * step}.{p}" for i in range(depth) for p in ("weight", "bias")[: 1 + bias]]
    assert list(h.state_dict()) == expected_keys


def test_depth_two_computes_relu_mlp():
    torch.manual_seed(0)
    h = head(hidden=5, head_depth=2, head_hidden_size=7, enable_softmax=False)
    x = torch.randn(1, 3, 5)
    l0, l1 = h.layers[0], h.layers[-1]
    expected = (torch.relu(x @ l0.weight.T + l0.bias) @ l1.weight.T + l1.bias).unsqueeze(2).expand(1, 3, 3, 4)
    torch.testing.assert_close(h(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_softmax_with_temperature(T):
    h = identity_head(softmax_temperature=T)
    s = h(Z)
    assert s.shape == (1, 2, 3, 4)
    torch.testing.assert_close(s, torch.softmax(Z / T, dim=-1).unsqueeze(2).expand(1, 2, 3, 4), rtol=0, atol=1e-7)
    for t in range(2):
        assert s[0, t, 0].tolist() == pytest.approx(softmax_by_hand(Z[0, t].tolist(), T), abs=1e-7)


def test_no_softmax_gives_raw_logits():
    h = identity_head(enable_softmax=False)
    assert torch.equal(h(Z), Z.unsqueeze(2).expand(1, 2, 3, 4))


def test_top_k_without_resoftmax_zeroes_exactly_the_others():
    h = identity_head(top_k=2)
    s = h(Z)
    p = torch.softmax(Z, dim=-1)
    # token 0 keeps experts 0 (2.0) and 3 (1.0); token 1 keeps 1 (3.0) and 3 (0.2)
    keep = torch.tensor([[[True, False, False, True], [False, True, False, True]]])
    for l in range(3):
        assert torch.equal(s[:, :, l][keep], p[keep])  # unchanged, bit for bit
        assert torch.equal(s[:, :, l][~keep], torch.zeros(4))
    assert s[0, 0, 0].tolist() == pytest.approx([softmax_by_hand(Z[0, 0].tolist())[0], 0, 0,
                                                  softmax_by_hand(Z[0, 0].tolist())[3]], abs=1e-7)


def test_top_k_on_raw_logits():
    h = identity_head(top_k=1, enable_softmax=False)
    s = h(Z)[:, :, 0]
    assert s.tolist() == [[[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]]]


def test_top_k_with_softmax_topk_is_a_softmax_over_the_kept_entries():
    T = 0.5
    h = identity_head(top_k=2, enable_softmax_topk=True, softmax_temperature=T)
    s = h(Z)
    for t, kept in ((0, (0, 3)), (1, (1, 3))):
        p = softmax_by_hand(Z[0, t].tolist(), T)  # first the tempered softmax over all experts ...
        q = softmax_by_hand([p[e] for e in kept])  # ... then a softmax over the kept ones
        expected = [0.0] * 4
        for e, v in zip(kept, q):
            expected[e] = v
        for l in range(3):
            assert s[0, t, l].tolist() == pytest.approx(expected, abs=1e-7)
            assert float(s[0, t, l].sum()) == pytest.approx(1.0, abs=1e-7)
    # token 0 by hand: p0 = e^4 / (e^4 + e^-2 + e^1 + e^2), p3 = e^2 / (...), q0 = e^p0 / (e^p0 + e^p3)
    den = math.exp(4) + math.exp(-2) + math.exp(1) + math.exp(2)
    p0, p3 = math.exp(4) / den, math.exp(2) / den
    assert float(s[0, 0, 0, 0]) == pytest.approx(math.exp(p0) / (math.exp(p0) + math.exp(p3)), abs=1e-7)


def test_top_k_with_softmax_topk_on_raw_logits():
    h = identity_head(top_k=3, enable_softmax_topk=True, enable_softmax=False)
    s = h(Z)[0, :, 1]
    e = math.exp
    assert s[0].tolist() == pytest.approx([e(2) / (e(2) + e(0.5) + e(1)), 0.0, e(0.5) / (e(2) + e(0.5) + e(1)),
                                           e(1) / (e(2) + e(0.5) + e(1))], abs=1e-7)
    assert s[1].tolist() == pytest.approx([e(0.1) / (e(0.1) + e(3) + e(0.2)), e(3) / (e(0.1) + e(3) + e(0.2)), 0.0,
                                           e(0.2) / (e(0.1) + e(3) + e(0.2))], abs=1e-7)


def test_top_k_equal_to_number_of_experts():
    h = identity_head(top_k=4)
    torch.testing.assert_close(h(Z)[:, :, 0], torch.softmax(Z, -1), rtol=0, atol=0)
    h = identity_head(top_k=4, enable_softmax_topk=True, enable_softmax=False)
    torch.testing.assert_close(h(Z)[:, :, 0], torch.softmax(Z, -1), rtol=0, atol=0)


def test_layerwise_logits_map_to_layer_and_expert():
    L, E = 3, 4
    h = head(hidden=L * E, num_layers=L, layerwise_scalings=True, enable_softmax=False)
    with torch.no_grad():
        h.layers[0].weight.copy_(torch.eye(L * E))
        h.layers[0].bias.zero_()
    x = torch.arange(2 * L * E, dtype=torch.float32).reshape(1, 2, L * E)
    s = h(x)
    assert s.shape == (1, 2, L, E)
    for t in range(2):
        for l in range(L):
            assert s[0, t, l].tolist() == [float(t * L * E + l * E + e) for e in range(E)]
    # with the softmax, each layer gets its own distribution
    h.config.enable_softmax = True
    s = h(x)
    torch.testing.assert_close(s, torch.softmax(x.reshape(1, 2, L, E), -1), rtol=0, atol=0)
    # softmax is shift-invariant and each layer's logits here are [0, 1, 2, 3] + offset
    torch.testing.assert_close(s[0, 0, 2], torch.tensor(softmax_by_hand([0.0, 1, 2, 3])), rtol=0, atol=1e-7)


def test_layerwise_scalings_differ_across_layers():
    torch.manual_seed(0)
    h = head(hidden=6, num_layers=3, layerwise_scalings=True)
    s = h(torch.randn(2, 5, 6))
    assert (s[:, :, 0] - s[:, :, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [{}, {"top_k": 2}, {"top_k": 3, "enable_softmax_topk": True}, {"head_depth": 3}])
def test_non_layerwise_scalings_are_identical_across_layers(cfg):
    torch.manual_seed(0)
    h = head(hidden=6, num_layers=5, **cfg)
    s = h(torch.randn(2, 7, 6))
    assert s.shape == (2, 7, 5, 4)
    for l in range(1, 5):
        assert torch.equal(s[:, :, l], s[:, :, 0])


def test_head_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    h = head(hidden=6, head_depth=2, head_dropout=0.5, enable_softmax=False)
    x = torch.randn(2, 7, 6)
    e1, e2 = h(x), h(x)
    assert torch.equal(e1, e2)
    h.train()
    t1, t2 = h(x), h(x)
    assert (t1 - t2).abs().max() > 1e-3
