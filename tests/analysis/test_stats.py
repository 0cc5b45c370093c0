"""Statistics over scalings, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from xlora.analysis import compare, expert_stats, mixture_summary, token_entropy, topk_coverage

NAMES = ["alpha", "beta", "gamma"]
LAYERS = ["m.l0.q", "m.l1.q"]


def hand_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """b=1, t=3 (the last token is padding), L=2, E=3."""
    s = torch.tensor([[
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],    # token 0: layer mean [0.3, 0.45, 0.25] -> beta
        [[0.2, 0.2, 0.6], [0.45, 0.35, 0.2]],  # token 1: layer mean [0.325, 0.275, 0.4] -> gamma
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],    # padding: must not count
    ]])
    return s, torch.tensor([[1, 1, 0]])


def test_expert_stats_equal_hand_computed_values():
    s, mask = hand_tensor()
    st = expert_stats(s, NAMES, LAYERS, mask=mask)
    assert st.num_tokens == 2
    # mean over 2 tokens of the layer means: ([0.3, 0.45, 0.25] + [0.325, 0.275, 0.4]) / 2
    assert st.mean_weight == pytest.approx({"alpha": 0.3125, "beta": 0.3625, "gamma": 0.325})
    assert st.dominant_share == pytest.approx({"alpha": 0.0, "beta": 0.5, "gamma": 0.5})
    # layer 0: ([0.5, 0.3, 0.2] + [0.2, 0.2, 0.6]) / 2; argmax alpha then gamma
    # layer 1: ([0.1, 0.6, 0.3] + [0.45, 0.35, 0.2]) / 2; argmax beta then alpha
    assert st.layer_mean_weight["m.l0.q"] == pytest.approx({"alpha": 0.35, "beta": 0.25, "gamma": 0.4})
    assert st.layer_mean_weight["m.l1.q"] == pytest.approx({"alpha": 0.275, "beta": 0.475, "gamma": 0.25})
    assert st.layer_dominant_share["m.l0.q"] == pytest.approx({"alpha": 0.5, "beta": 0.0, "gamma": 0.5})
    assert st.layer_dominant_share["m.l1.q"] == pytest.approx({"alpha": 0.5, "beta": 0.5, "gamma": 0.0})
    # without the mask the padding token (all alpha) counts: alpha mean (0.3 + 0.325 + 1) / 3
    assert expert_stats(s, NAMES, LAYERS).mean_weight["alpha"] == pytest.approx(1.625 / 3)
    # [t, L, E] works as a batch of one
    assert expert_stats(s[0, :2], NAMES, LAYERS) == st
    assert list(expert_stats(s).mean_weight) == ["expert0", "expert1", "expert2"]


def test_entropy_and_topk_coverage_equal_hand_computed_values():
    s = torch.tensor([[
        [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],          # H = (ln 2 + 0) / 2; top-1 (0.5 + 1) / 2; top-2 1
        [[1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]],  # H = ln 3; top-1 1/3; top-2 2/3
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],          # padding
    ]])
    mask = torch.tensor([[1, 1, 0]])
    h = token_entropy(s)
    assert h.shape == (1, 3)
    torch.testing.assert_close(h[0, :2], torch.tensor([math.log(2) / 2, math.log(3)], dtype=torch.float64))
    torch.testing.assert_close(topk_coverage(s, 1)[0, :2], torch.tensor([0.75, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(topk_coverage(s, 2)[0, :2], torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    m = mixture_summary(s, mask, ks=(1, 2, 3))
    assert m.num_tokens == 2
    assert m.mean_entropy == pytest.approx((math.log(2) / 2 + math.log(3)) / 2)
    assert m.normalized_entropy == pytest.approx((math.log(2) / 2 + math.log(3)) / 2 / math.log(3))
    assert m.topk_coverage == pytest.approx({1: (0.75 + 1 / 3) / 2, 2: (1 + 2 / 3) / 2, 3: 1.0})
    with pytest.raises(ValueError, match="k=4 must be between 1 and the number of experts 3"):
        topk_coverage(s, 4)
    with pytest.raises(ValueError, match="the mask keeps no token"):
        mixture_summary(s, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 2\) does not match"):
        expert_stats(s, mask=torch.ones(1, 2))


def test_compare_two_prompts_by_hand():
    s, mask = hand_tensor()
    a = expert_stats(s, NAMES, LAYERS, mask=mask)
    b = expert_stats(torch.full((1, 4, 2, 3), 1 / 3), NAMES, LAYERS)  # uniform: 1/3 each, alpha dominates (ties)
    d = compare(a, b)
    assert d.mean_weight == pytest.approx({"alpha": 0.3125 - 1 / 3, "beta": 0.3625 - 1 / 3, "gamma": 0.325 - 1 / 3})
    assert d.dominant_share == pytest.approx({"alpha": -1.0, "beta": 0.5, "gamma": 0.5})
    assert d.layer_mean_weight["m.l1.q"] == pytest.approx({"alpha": 0.275 - 1 / 3, "beta": 0.475 - 1 / 3,
                                                           "gamma": 0.25 - 1 / 3})
    # ½ (|0.3125 - 1/3| + |0.3625 - 1/3| + |0.325 - 1/3|) = ½ (0.0208333 + 0.0291667 + 0.0083333)
    assert d.total_variation == pytest.approx(0.5 * (1 / 48 + 7 / 240 + 1 / 120))
    assert compare(a, a).total_variation == 0.0
    with pytest.raises(ValueError, match="cannot compare statistics of experts"):
        compare(a, expert_stats(s, ["x", "y", "z"], LAYERS))
