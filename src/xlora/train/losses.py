"""The terms of the head-training loss: next-token cross-entropy and the scalings regularizers (routing supervision
is :mod:`xlora.train.routing`).

Shapes: ``logits`` ``[b, t, V]``, ``labels`` and ``attention_mask`` ``[b, t]``, ``scalings`` ``[b, t, L, E]``
(``L`` adapted modules, ``E`` experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xlora.train.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labels != IGNORE_INDEX."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The number of tokens that take the next-token loss in ``batch``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def scalings_regularizer(scalings: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``balance``: ``E·Σ_e p̄_e²`` of the token-mean scalings; ``entropy``: mean per-token entropy."""
    s = scalings.float().mean(dim=2)  # [b, t, E], layers averaged
    m = mask.to(s.dtype).unsqueeze(-1)  # [b, t, 1]
    if kind == "balance":
        p = (s * m).sum((0, 1)) / m.sum().clamp_min(1)
        return s.shape[-1] * (p * p).sum()
    ent = -(s.clamp_min(1e-9).log() * s).sum(-1, keepdim=True)
    return (ent * m).sum() / m.sum().clamp_min(1)
