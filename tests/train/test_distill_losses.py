"""The distillation's masks and routing score (xlora.train.distill_losses), checked position by position."""

from __future__ import annotations

import pytest
import torch

from xlora.train.distill_losses import distill_mask, masked_mean, own_top1


def batch() -> dict[str, torch.Tensor]:
    """Three rows of 6 tokens: row 0 names expert 1 (completion tokens 3-4, then a pad), row 1 names none
    (completion 4-5), row 2 names expert 0 but its completion was truncated away (no scored position)."""
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.full((3, 6), -100)
    labels[0, 3:5], labels[1, 4:6] = 7, 8
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    return {"attention_mask": attention, "labels": labels, "routing_target": target}


def test_the_three_position_sets_by_hand():
    b = batch()
    assert distill_mask(b, "all").tolist() == b["attention_mask"].tolist()
    assert distill_mask(b, "scored").tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0] * 6]
    # unrouted: row 0 loses the positions predicting its completion (2, 3) to the routing term; row 1 names no
    # expert and row 2 has no scored position, so they keep every real token
    assert distill_mask(b, "unrouted").tolist() == [[1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]


def test_bad_position_sets_are_refused():
    b = batch()
    with pytest.raises(ValueError, match="positions must be one of .* got 'prompt'"):
        distill_mask(b, "prompt")
    del b["routing_target"]
    with pytest.raises(ValueError, match="positions='unrouted' needs the batch's routing_target"):
        distill_mask(b, "unrouted")


def test_masked_mean_counts_only_masked_positions():
    values = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    mask = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]])
    assert masked_mean(values, mask).item() == (0 + 5 + 8) / 3
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_own_top1_averages_the_scored_positions_and_modules_like_xlora_eval():
    b = batch()
    s = torch.zeros(3, 6, 2, 2)  # [b, t, L, E]
    s[0, :, :, 0] = 0.6  # row 0 leans to expert 0 on every position ...
    s[0, :, :, 1] = 0.4
    s[0, 2:4, 0] = torch.tensor([0.05, 0.95])  # ... but at its scored positions (2, 3) module 0 picks expert 1
    s[0, 2:4, 1] = torch.tensor([0.45, 0.55])  # and module 1 leans to it: p̄ = (0.25, 0.75)
    s[2, :, :, 0] = 1.0  # row 2 would be a hit, but has no scored position: not counted
    assert own_top1(s, b) == (1, 1)
    s[0, 2:4, 0] = torch.tensor([0.75, 0.25])  # now p̄ = (0.6, 0.4): a miss
    assert own_top1(s, b) == (0, 1)
