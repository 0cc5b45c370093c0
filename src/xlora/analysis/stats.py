"""Statistics over scalings: pure functions of a scalings tensor and an optional padding mask.

Shapes: ``b`` batch, ``t`` tokens, ``L`` adapted modules, ``E`` experts. Each function takes
scalings ``[b, t, L, E]`` (or ``[t, L, E]``) and a mask ``[b, t]`` (1 = real token) and returns
plain dataclasses of floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


def _prepare(scalings: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([b, t, L, E] float64, token weights [b, t] float64)`` from ``[t, L, E]`` or ``[b, t, L, E]``."""
    s = scalings.detach().cpu().double()
    if s.dim() == 3:
        s = s.unsqueeze(0)  # [1, t, L, E]
        mask = None if mask is None else mask.reshape(1, -1)
    if s.dim() != 4:
        raise ValueError(f"scalings must have shape [b, t, L, E] or [t, L, E], got {tuple(scalings.shape)}")
    w = torch.ones(s.shape[:2], dtype=torch.float64) if mask is None else mask.detach().cpu().double()
    if w.shape != s.shape[:2]:
        raise ValueError(f"mask of shape {tuple(w.shape)} does not match scalings' [b, t] = {tuple(s.shape[:2])}")
    if w.sum() == 0:
        raise ValueError("the mask keeps no token: statistics need at least one real token")
    return s, w


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [b, t, ...]`` over the tokens, weighted by ``w [b, t]`` -> ``[...]``."""
    w = w.reshape(*w.shape, *([1] * (x.dim() - 2)))
    return (x * w).sum((0, 1)) / w.sum()


def _names(prefix: str, n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"{prefix}{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"got {len(names)} {prefix} names for an axis of size {n}")
    return list(names)


@dataclass
class ExpertStats:
    """Per expert: mean weight and the share of tokens it dominates (argmax), overall and per adapted module.

    "Layer" here is an adapted module (the ``L`` axis: 180 on a 30-layer model with six projections
    each); ``layer_*`` dicts are keyed by module name. "Overall" dominance is the argmax of the
    module-averaged mixture of a token; per module, the argmax at that module. Ties go to the first expert.
    """

    num_tokens: int
    mean_weight: dict[str, float]
    dominant_share: dict[str, float]
    layer_mean_weight: dict[str, dict[str, float]] = field(default_factory=dict)
    layer_dominant_share: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expert_stats(scalings: torch.Tensor, expert_names: Sequence[str] | None = None,
                 layer_names: Sequence[str] | None = None, mask: torch.Tensor | None = None) -> ExpertStats:
    """Mean weight ``mean_{b,t,l} s[b,t,l,e]`` and dominant share of each expert over the real tokens.

    The per-layer entries are keyed by ``layer_names``, the adapted modules' names (``model.adapted_modules``,
    e.g. ``model.layers.3.self_attn.q_proj``; :meth:`ScalingsLog.expert_stats` passes them); without names
    they are ``module0``, ``module1``, ...
    """
    s, w = _prepare(scalings, mask)
    E, L = s.shape[-1], s.shape[-2]
    experts, layers = _names("expert", E, expert_names), _names("module", L, layer_names)

    def share(dominant: torch.Tensor) -> torch.Tensor:  # [b, t] expert index -> [E] share of tokens
        return _masked_mean(torch.nn.functional.one_hot(dominant, E).double(), w)

    layer_mean = _masked_mean(s, w)  # [L, E]
    overall = share(s.mean(2).argmax(-1))  # argmax of the layer-averaged mixture [b, t, E]
    per_layer = torch.stack([share(s[:, :, l].argmax(-1)) for l in range(L)])  # [L, E]
    return ExpertStats(
        num_tokens=int(w.sum().item()),
        mean_weight=dict(zip(experts, layer_mean.mean(0).tolist())),
        dominant_share=dict(zip(experts, overall.tolist())),
        layer_mean_weight={n: dict(zip(experts, r.tolist())) for n, r in zip(layers, layer_mean)},
        layer_dominant_share={n: dict(zip(experts, r.tolist())) for n, r in zip(layers, per_layer)},
    )


def _mixture(s: torch.Tensor) -> torch.Tensor:
    """Weights normalised to sum 1 over experts; negative weights (no softmax) are clipped to 0."""
    p = s.clamp_min(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def token_entropy(scalings: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's mixture ``H = -Σ_e p_e ln p_e``, averaged over layers: ``[b, t]``.

    0 means one expert; ``ln E`` means uniform. ``[t, L, E]`` input gives ``[t]``.
    """
    p = _mixture(scalings.double())
    return -(p * p.clamp_min(1e-300).log()).sum(-1).mean(-1)


def topk_coverage(scalings: torch.Tensor, k: int) -> torch.Tensor:
    """Mass of the ``k`` largest experts of each token's mixture, averaged over layers: ``[b, t]``."""
    E = scalings.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be between 1 and the number of experts {E}")
    return _mixture(scalings.double()).topk(k, dim=-1).values.sum(-1).mean(-1)


@dataclass
class MixtureSummary:
    """How spread the mixture is: mean entropy (nats, and as a fraction of ``ln E``) and top-k coverage."""

    num_tokens: int
    mean_entropy: float
    normalized_entropy: float
    topk_coverage: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mixture_summary(scalings: torch.Tensor, mask: torch.Tensor | None = None,
                    ks: Sequence[int] = (1, 2)) -> MixtureSummary:
    """Token-averaged :func:`token_entropy` and :func:`topk_coverage` (for each ``k`` in ``ks``) over real tokens."""
    s, w = _prepare(scalings, mask)
    E = s.shape[-1]
    h = float(_masked_mean(token_entropy(s), w))
    return MixtureSummary(
        num_tokens=int(w.sum().item()), mean_entropy=h, normalized_entropy=h / math.log(E) if E > 1 else 0.0,
        topk_coverage={k: float(_masked_mean(topk_coverage(s, k), w)) for k in ks if k <= E},
    )


@dataclass
class MixtureDiff:
    """``a - b`` of two :class:`ExpertStats` (two prompts or domains), overall and per layer.

    ``total_variation`` is ``½ Σ_e |Δ mean weight_e|``: 0 for identical average mixtures, 1 for
    mixtures on disjoint experts (when weights sum to 1).
    """

    mean_weight: dict[str, float]
    dominant_share: dict[str, float]
    layer_mean_weight: dict[str, dict[str, float]]
    total_variation: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(a: ExpertStats, b: ExpertStats) -> MixtureDiff:
    """Difference ``a - b`` of the mean weights and dominant shares of two sets of tokens."""
    if list(a.mean_weight) != list(b.mean_weight) or list(a.layer_mean_weight) != list(b.layer_mean_weight):
        raise ValueError(
            f"cannot compare statistics of experts {list(a.mean_weight)} with {list(b.mean_weight)} "
            "(or of other layers): compute both with the same model"
        )

    def sub(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
        return {k: x[k] - y[k] for k in x}

    mean = sub(a.mean_weight, b.mean_weight)
    return MixtureDiff(
        mean_weight=mean, dominant_share=sub(a.dominant_share, b.dominant_share),
        layer_mean_weight={l: sub(a.layer_mean_weight[l], b.layer_mean_weight[l]) for l in a.layer_mean_weight},
        total_variation=0.5 * sum(abs(v) for v in mean.values()),
    )
