"""Routing supervision: an optional loss that pulls each example's scalings towards the experts its record names.

A training record may name its expert: ``{"domain": "quantum", ...}`` (the field is ``TrainConfig.routing_key``),
or several, ``{"experts": ["quantum", "mathematics"], ...}`` (the list wins when both are given). Its target
``q`` over the ``E`` experts is one-hot on the named expert, or uniform over the listed ones. With
``TrainConfig.routing_weight = w > 0`` the trainer adds ``w · CE`` to the loss, where
``CE = mean over the examples with a target of -Σ_e q_e · log p̄_e`` and ``p̄`` is the example's scalings
averaged over its routed tokens and over the adapted modules. ``TrainConfig.routing_tokens`` picks those tokens
(:func:`xlora.train.losses.with_routing_mask`):
``"all"`` (attention mask 1) or ``"scored"``, the positions that predict a scored (completion) token, which are
the positions ``xlora eval`` measures routing on; the prompt's opening tokens (a system prompt, a greeting) say
nothing about the domain, and over ``"all"`` they dominate ``p̄``. A record that names no expert, any name that is
not an expert, or an example without a routed token has no target and takes no routing loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ROUTING_LIST_KEY = "experts"  # a record's list of expert names: a uniform target over them
_LOG_FLOOR = 1e-9  # log p̄ of a scaling that is exactly 0 (a top-k mask): finite, very large loss


def record_target(record: dict[str, Any], key: str) -> tuple[str, ...]:
    """The expert names of ``record``: its ``experts`` list if it has one, else ``(record[key],)``, else ``()``.

    Raises:
        ValueError: ``experts`` is not a list of strings, or ``record[key]`` is not a string (or null).
    """
    names = record.get(ROUTING_LIST_KEY)
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"field {ROUTING_LIST_KEY!r} must be a list of expert names (strings), got "
                             f"{names!r:.80}; fix the record or drop the field")
        return tuple(names)
    name = record.get(key)
    if name is None:
        return ()
    if not isinstance(name, str):
        raise ValueError(f"field {key!r} (routing_key) must be an expert name (a string), got {name!r:.80}; fix the "
                         f"record or set --routing-key to the field that names the expert")
    return (name,)


def routing_cross_entropy(scalings: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each example's mean scalings against its routing target.

    For example ``i`` with mean scalings ``p̄_i[e] = mean over l and over the tokens t with mask[i, t] = 1 of
    s[i, t, l, e]`` and target distribution ``q_i`` (a row of ``target``), ``CE_i = -Σ_e q_i[e] · log p̄_i[e]``
    (``p̄`` floored at 1e-9). Rows of ``target`` that are all zero (no known expert) take no loss.

    Args:
        scalings: ``[b, t, L, E]``, each ``s[i, t, l]`` a distribution over the experts (softmax on).
        mask: ``[b, t]`` routing mask: 1 on the tokens that feed ``p̄`` (the attention mask, or the scored positions
            of :func:`xlora.train.losses.with_routing_mask`), 0 elsewhere. A row without any 1 takes no loss
            (``with_routing_mask`` also zeroes its target, so the trainer does not count it).
        target: ``[b, E]``: ``q_i`` (rows summing to 1), or a zero row for an example without a target.
        reduction: ``"mean"`` over the examples with a target (0 if there is none) or ``"sum"`` over them.

    Returns:
        A scalar tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    p = mean_scalings(scalings, mask)  # [b, E]
    q = target.float() * (mask.sum(1, keepdim=True) > 0).float()  # a row without a routed token takes no loss
    ce = -(q * p.clamp_min(_LOG_FLOOR).log()).sum(-1)  # [b]; 0 on zero rows
    if reduction == "sum":
        return ce.sum()
    return ce.sum() / routed_examples(q).clamp_min(1)


def mean_scalings(scalings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``p̄`` ``[b, E]`` (float32): ``scalings`` ``[b, t, L, E]`` averaged over the modules and over the tokens where
    ``mask`` ``[b, t]`` is 1 (a row without any: zeros)."""
    s = scalings.float().mean(dim=2)  # [b, t, E], layers averaged
    m = mask.to(s.dtype).unsqueeze(-1)  # [b, t, 1]
    return (s * m).sum(1) / m.sum(1).clamp_min(1)


def routed_examples(target: torch.Tensor) -> torch.Tensor:
    """How many rows of ``target`` ``[b, E]`` are a distribution (the examples that take the routing loss)."""
    return (target.sum(-1) > 0).sum()


def routing_targets(targets: Sequence[tuple[str, ...]], experts: Sequence[str]) -> torch.Tensor:
    """``[b, E]`` float32 target distributions: uniform over the experts each example names, in the order of
    ``experts``; a zero row where an example names none, or names one that is not an expert."""
    index = {name: e for e, name in enumerate(experts)}
    out = torch.zeros((len(targets), len(experts)), dtype=torch.float32)
    for row, names in enumerate(targets):
        if names and all(n in index for n in names):
            for n in set(names):
                out[row, index[n]] = 1.0
            out[row] /= out[row].sum()
    return out


def check_routing_targets(targets: Sequence[tuple[str, ...]], experts: Sequence[str], key: str,
                          weight: float) -> int:
    """Refuse routing supervision that no training record can feed; the number of records taking no routing loss.

    Raises:
        ValueError: no record names only experts (in ``key`` or in its ``experts`` list); lists the names found.
    """
    known = set(experts)
    unrouted = sum(1 for names in targets if not names or not set(names) <= known)
    if unrouted == len(targets):
        found = sorted({n for names in targets for n in names})
        raise ValueError(f"routing_weight={weight} but no training record names an expert in {key!r} (or a list "
                         f"{ROUTING_LIST_KEY!r} of them): the names found are {found[:20]} and the experts are "
                         f"{list(experts)}; label the records with expert names, set --routing-key to the field that "
                         f"holds them, or set routing_weight=0")
    return unrouted
