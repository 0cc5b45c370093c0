"""The terms of the distillation loss (:mod:`xlora.train.distill`) and the masks that pick their tokens.

Shapes: logits ``z`` and scalings ``s`` ``[b, t, L, E]`` (``L`` adapted modules, ``E`` experts); masks ``[b, t]``.

    KL  = Σ_{b,t} m_bt · mean_l Σ_e p_T (log p_T − log p_S) / Σ_{b,t} m_bt,   p = softmax(z / τ)
    MSE = Σ_{b,t} m_bt · mean_{l,e} (s_S − s_T)² / Σ_{b,t} m_bt

The distillation mask ``m`` (:func:`distill_mask`) is the attention mask (``"all"``), only the positions that
predict a completion token (``"scored"``), or every position that takes no routing loss (``"unrouted"``: the
prompt of a record that names its expert, every token of one that names none). The routing term itself is
:func:`xlora.train.routing.routing_cross_entropy` over the scored positions of the records that name an expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xlora.train.losses import scored_positions, with_routing_mask
from xlora.train.routing import mean_scalings

POSITIONS = ("all", "scored", "unrouted")  # the tokens the distillation loss averages


def distill_mask(batch: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    """``[b, t]`` mask of the tokens the distillation term averages (see the module doc).

    ``"unrouted"`` needs ``batch["routing_target"]`` ``[b, E]`` (:func:`xlora.train.data.collate` with experts):
    on a row with a target its scored positions are left to the routing term.
    """
    mask = batch["attention_mask"]
    if positions == "all":
        return mask
    if positions == "scored":
        return mask * scored_positions(batch["labels"]).to(mask.dtype)
    if positions == "unrouted":
        if "routing_target" not in batch:
            raise ValueError("positions='unrouted' needs the batch's routing_target (routing_weight > 0)")
        routed = with_routing_mask(batch, "scored")
        has_target = (routed["routing_target"].sum(-1, keepdim=True) > 0).to(mask.dtype)  # [b, 1]
        return mask * (1 - has_target * routed["routing_mask"].to(mask.dtype))
    raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token`` ``[b, t]`` over the positions where ``mask`` ``[b, t]`` is 1 (0 when there is none)."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def distill_kl(z_t: torch.Tensor, z_s: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean over masked tokens and l of Σ_e p_T log(p_T / p_S)``, ``p = softmax(z / temperature)``."""
    # float64: near the optimum a float32 KL's gradient is rounding noise, which Adam scales up to lr-sized steps
    log_t = torch.log_softmax(z_t.double() / temperature, dim=-1)
    log_s = torch.log_softmax(z_s.double() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # [b, t, L]
    return masked_mean(kl.mean(-1), mask)


def distill_mse(s_t: torch.Tensor, s_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean over masked tokens of mean_{l,e} (s_S − s_T)²``."""
    return masked_mean((s_s - s_t).pow(2).mean((-2, -1)), mask)


def top1_agreement(s_t: torch.Tensor, s_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of (masked token, adapted module) pairs where both scalings pick the same top expert."""
    same = (s_t.argmax(-1) == s_s.argmax(-1)).float().mean(-1)  # [b, t]
    return masked_mean(same, mask)


def own_top1(scalings: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(hits, records)``: of the records that name one expert and have a scored position, how many have that
    expert as the argmax of ``p̄`` (scalings averaged over the scored positions and modules), as ``xlora eval``
    scores routing."""
    routed = with_routing_mask(batch, "scored")
    target, p = routed["routing_target"], mean_scalings(scalings, routed["routing_mask"])  # [b, E] each
    single = (target > 0).sum(-1) == 1  # one named expert (a list of several is not scored)
    hits = (p.argmax(-1) == target.argmax(-1)) & single
    return int(hits.sum()), int(single.sum())
