"""Helpers shared by the decoding tests: a tiny X-LoRA model, a left-padded batch, and greedy decoding by full
recomputation at every step (the reference every cached path is compared with)."""

from __future__ import annotations

import torch
from conftest import DEVICE, VOCAB, randomize_head

from xlora import XLoraConfig, XLoraModel


def build(setup, seed: int = 3, **cfg) -> XLoraModel:
    config = XLoraConfig(experts={k: str(v) for k, v in setup.expert_dirs.items()}, head_depth=2,
                         head_hidden_size=16, **cfg)
    model = XLoraModel(setup.base(), config).eval()
    randomize_head(model, seed, 0.7)
    return model


def left_padded_batch(seed: int = 0):
    """Three prompts of lengths 6, 4 and 2, left-padded with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def reference_greedy(model: XLoraModel, ids, mask, steps: int, scalings_for=None):
    """Recompute the whole sequence at every step, without any cache."""
    seq, m, all_logits, all_scalings = ids.clone(), mask.clone(), [], []
    for _ in range(steps):
        kwargs = {"scalings": scalings_for(seq.shape[1])} if scalings_for else {}
        out = model(input_ids=seq, attention_mask=m, position_ids=positions(m), use_cache=False, **kwargs)
        all_logits.append(out.logits[:, -1])
        all_scalings.append(out.scalings)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq, all_logits, all_scalings
