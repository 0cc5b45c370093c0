"""The scripted model (tests/scripted.py) answers as scripted by a wide margin: alone, under any mixture of
random experts, and in a left-padded batch — the property the tests that use it rely on across CPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import GPT2_TARGETS, make_expert
from scripted import MARGIN, script_answers, scripted_model

from xlora import XLoraConfig, XLoraModel

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
ANSWERS = [[20, 21, 20, 2], [30, 30, 31, 2]]


def margins(logits: torch.Tensor, positions: list[int], wanted: list[int]) -> list[float]:
    """The scripted token's logit minus the best other token's, at each position."""
    out = []
    for p, w in zip(positions, wanted):
        row = logits[p].clone()
        top = row[w].item()
        row[w] = -float("inf")
        out.append(top - row.max().item())
    return out


def test_script_refuses_clashing_answers():
    with pytest.raises(ValueError, match="differ by more than the answers' lengths"):
        script_answers([[5, 6], [7, 8]], [[20, 2], [21, 2]])
    with pytest.raises(ValueError, match="n_positions=4"):
        scripted_model({10: 3}, 40, 4)


def test_margin_holds_under_a_mixture_and_left_padding(tmp_path):
    base = scripted_model(script_answers(PROMPTS, ANSWERS), 40, 32)
    experts = {n: str(make_expert(base, tmp_path / n, r=4, alpha=8, targets=GPT2_TARGETS, seed=i + 1))
               for i, n in enumerate(["a", "b"])}
    model = XLoraModel(base, XLoraConfig(experts=experts, head_depth=1, global_scaling_weight=1.0)).eval()
    width = max(len(p) + len(a) for p, a in zip(PROMPTS, ANSWERS))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        seq = p + a[:-1]  # teacher forcing: the answer's tokens read back in
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for scalings in ("zero", "uniform", "a", None):  # None: X-LoRA's own (untrained, random) router
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions, scalings=scalings).logits
        for row, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
            start = width - len(p) - len(a) + 1
            got = margins(logits[row], list(range(start + len(p) - 1, start + len(p) - 1 + len(a))), a)
            assert min(got) > 0.9 * MARGIN, (scalings, row, got)
