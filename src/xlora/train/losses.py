"""The terms of the head-training loss: next-token cross-entropy and the scalings regularizers (routing supervision
is :mod:`xlora.train.routing`; :func:`with_routing_mask` picks the tokens it averages).

Shapes: ``logits`` ``[b, t, V]``, ``labels`` and ``attention_mask`` ``[b, t]``, ``scalings`` ``[b, t, L, E]``
(``L`` adapted modules, ``E`` experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xlora.train.config import ROUTING_TOKENS
from xlora.train.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labels != IGNORE_INDEX."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The number of tokens that take the next-token loss in ``batch``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[b, t]`` bool: position ``t`` predicts a scored token (``labels[:, t + 1] != IGNORE_INDEX``); the last is 0."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return out


def with_routing_mask(batch: dict[str, torch.Tensor], tokens: str) -> dict[str, torch.Tensor]:
    """``batch`` with ``routing_mask`` ``[b, t]`` (the tokens whose scalings feed ``p̄``) and ``routing_target``
    zeroed on the examples without such a token; unchanged when it has no ``routing_target``.

    ``tokens="all"``: the attention mask. ``tokens="scored"``: ``mask[i, t] = 1`` iff ``labels[i, t + 1]`` is
    scored (not ``IGNORE_INDEX``), i.e. position ``t`` predicts a completion token.
    """
    if tokens not in ROUTING_TOKENS:
        raise ValueError(f"routing_tokens must be one of {ROUTING_TOKENS}, got {tokens!r}")
    if "routing_target" not in batch:
        return batch
    if tokens == "all":
        mask = batch["attention_mask"]
    else:
        mask = scored_positions(batch["labels"]).to(batch["attention_mask"].dtype)
    target = batch["routing_target"] * (mask.sum(1, keepdim=True) > 0).to(batch["routing_target"].dtype)
    return {**batch, "routing_mask": mask, "routing_target": target}


def step_batch(batch: dict[str, torch.Tensor], routing_tokens: str, lm_examples: str) -> dict[str, torch.Tensor]:
    """``batch`` as a training step takes it: :func:`with_routing_mask`, then with ``lm_examples="unrouted"``
    :func:`without_routed_lm`."""
    batch = with_routing_mask(batch, routing_tokens)
    return without_routed_lm(batch) if lm_examples == "unrouted" else batch


def without_routed_lm(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` (after :func:`with_routing_mask`) whose examples with a routing target take no next-token loss:
    their labels become ``IGNORE_INDEX`` (``TrainConfig.lm_examples = "unrouted"``); unchanged without targets."""
    if "routing_target" not in batch:
        return batch
    routed = batch["routing_target"].sum(-1) > 0  # [b]
    return {**batch, "labels": batch["labels"].masked_fill(routed.unsqueeze(1), IGNORE_INDEX)}


def scalings_regularizer(scalings: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``balance``: ``E·Σ_e p̄_e²`` of the token-mean scalings; ``entropy``: mean per-token entropy."""
    s = scalings.float().mean(dim=2)  # [b, t, E], layers averaged
    m = mask.to(s.dtype).unsqueeze(-1)  # [b, t, 1]
    if kind == "balance":
        p = (s * m).sum((0, 1)) / m.sum().clamp_min(1)
        return s.shape[-1] * (p * p).sum()
    ent = -(s.clamp_min(1e-9).log() * s).sum(-1, keepdim=True)
    return (ent * m).sum() / m.sum().clamp_min(1)
