"""Seeing the mixture: a log of the scalings a model applied, and statistics over scalings.

Shapes: ``b`` batch, ``t`` tokens, ``L`` adapted modules (``model.adapted_modules``), ``E`` experts.
A log entry is one forward call: the scalings ``[b, t, L, E]`` it applied to its input tokens
``[b, t]``. Row ``t`` of a sequence is therefore "the mixture used while reading token ``t``",
which is the mixture that predicted token ``t + 1``.

The statistics are pure functions of a scalings tensor ``[b, t, L, E]`` (or ``[t, L, E]``) and an
optional padding mask ``[b, t]`` (1 = real token); they return plain dataclasses of floats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from xlora._io import atomic_save_safetensors

LOG_FORMAT = "xlora-scalings-log/1"
_META_KEY = "xlora_scalings_log"


@dataclass
class LogEntry:
    """One forward call: ``scalings`` ``[b, t, L, E]``, ``input_ids`` and ``attention_mask`` ``[b, t]``."""

    scalings: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class ScalingsLog:
    """The scalings of successive forward calls, with the expert and layer names they refer to.

    Fill it with :meth:`record` (one forward's ``out.scalings``), :meth:`record_generation` (after
    ``model.generate(..., record_scalings=True)``) or, on a model that owns a log, with
    :func:`record_scalings`.

    Args:
        expert_names: the ``E`` axis, ``model.xlora_config.expert_names``.
        layer_names: the ``L`` axis, ``model.adapted_modules``.
        info: free-form JSON-serialisable context saved with the log (prompt, model path, ...).
    """

    def __init__(self, expert_names: Sequence[str], layer_names: Sequence[str],
                 info: dict[str, Any] | None = None) -> None:
        self.expert_names = list(expert_names)
        self.layer_names = list(layer_names)
        self.info: dict[str, Any] = dict(info or {})
        self.entries: list[LogEntry] = []

    @classmethod
    def for_model(cls, model: Any, info: dict[str, Any] | None = None) -> ScalingsLog:
        """An empty log with ``model``'s expert names and adapted module names."""
        return cls(model.xlora_config.expert_names, model.adapted_modules, info)

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, scalings: torch.Tensor, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> None:
        """Append one forward call's scalings ``[b, t, L, E]``.

        ``attention_mask`` may cover the past tokens too (``[b, past + t]``, as ``generate`` passes
        it); only its last ``t`` columns are kept. Tensors are detached, not copied to the CPU.
        """
        if scalings.dim() != 4 or tuple(scalings.shape[2:]) != (len(self.layer_names), len(self.expert_names)):
            raise ValueError(
                f"scalings of shape {tuple(scalings.shape)} do not fit this log's "
                f"[b, t, L={len(self.layer_names)}, E={len(self.expert_names)}]: was it made for another model?"
            )
        b, t = scalings.shape[:2]
        for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if x is not None and (x.dim() != 2 or x.shape[0] != b or x.shape[1] < t):
                raise ValueError(f"{name} of shape {tuple(x.shape)} does not cover scalings [b={b}, t={t}, ...]")
        self.entries.append(LogEntry(
            scalings.detach(),
            None if input_ids is None else input_ids[:, -t:].detach(),
            None if attention_mask is None else attention_mask[:, -t:].detach(),
        ))

    def record_generation(self, model: Any, sequences: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> None:
        """Append the steps of the last ``model.generate(..., record_scalings=True)``.

        Args:
            model: the model that generated (its ``last_generation_scalings()`` are read).
            sequences: ``generate``'s output ``[b, prompt + new]``.
            attention_mask: the prompt's mask ``[b, prompt]``; generated tokens count as real.
        """
        steps = model.last_generation_scalings()
        if not steps:
            raise ValueError("model.last_generation_scalings() is empty: call generate(..., record_scalings=True) first")
        pos = 0
        for s in steps:
            t = s.shape[1]
            if pos + t > sequences.shape[1]:
                raise ValueError(f"sequences of length {sequences.shape[1]} are shorter than the recorded steps")
            mask = attention_mask[:, pos:pos + t] if attention_mask is not None and pos == 0 else None
            self.record(s, sequences[:, pos:pos + t], mask)
            pos += t

    def sequence(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch row ``row`` over all entries, padding dropped: ``(ids [T], scalings [T, L, E])`` on the CPU.

        Entries without ``input_ids`` get id ``-1``.
        """
        ids, rows = [], []
        for e in self.entries:
            keep = torch.ones(e.scalings.shape[1], dtype=torch.bool) if e.attention_mask is None \
                else e.attention_mask[row].cpu().bool()
            rows.append(e.scalings[row].cpu()[keep])
            x = e.input_ids[row].cpu() if e.input_ids is not None else torch.full(keep.shape, -1)
            ids.append(x[keep])
        if not rows:
            return torch.empty(0, dtype=torch.long), torch.empty(0, len(self.layer_names), len(self.expert_names))
        return torch.cat(ids), torch.cat(rows)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (atomically); names and ``info`` go in its header as JSON."""
        tensors: dict[str, torch.Tensor] = {}
        kinds = []
        for i, e in enumerate(self.entries):
            tensors[f"{i}.scalings"] = e.scalings
            kinds.append([k for k in ("input_ids", "attention_mask") if getattr(e, k) is not None])
            for k in kinds[-1]:
                tensors[f"{i}.{k}"] = getattr(e, k)
        meta = {"format": LOG_FORMAT, "expert_names": self.expert_names, "layer_names": self.layer_names,
                "entries": kinds, "info": self.info}
        path = Path(path)
        atomic_save_safetensors(path, tensors, metadata={"format": "pt", _META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScalingsLog:
        """Read a file written by :meth:`save`; tensors come back bit-exact (same dtype and values)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scalings log {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not a scalings log written by ScalingsLog.save ({err!r})") from None
        if meta.get("format") != LOG_FORMAT:
            raise ValueError(f"{str(path)!r} has format {meta.get('format')!r}; this xlora reads {LOG_FORMAT!r}")
        log = cls(meta["expert_names"], meta["layer_names"], meta.get("info"))
        for i, kinds in enumerate(meta["entries"]):
            extra = {k: tensors[f"{i}.{k}"] for k in kinds}
            log.entries.append(LogEntry(tensors[f"{i}.scalings"], **extra))
        return log


@contextmanager
def record_scalings(model: Any, log: ScalingsLog | None = None) -> Iterator[ScalingsLog]:
    """``with record_scalings(model) as log:`` every forward (and each ``generate`` step) is logged.

    Needs a model that owns an optional log (``model.scalings_log``, appended to in ``forward``
    when not ``None``); without it, call :meth:`ScalingsLog.record` on ``out.scalings`` instead.
    """
    if not hasattr(model, "scalings_log"):
        raise TypeError(
            f"{type(model).__name__} has no scalings_log attribute, so record_scalings cannot see its forward "
            "calls; record explicitly: log.record(out.scalings, input_ids, attention_mask)"
        )
    log = log if log is not None else ScalingsLog.for_model(model)
    saved = model.scalings_log
    model.scalings_log = log
    try:
        yield log
    finally:
        model.scalings_log = saved


# ---------------------------------------------------------------------- statistics
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
    """Per expert: mean weight and the share of tokens it dominates (argmax), overall and per layer.

    "Overall" dominance is the argmax of the layer-averaged mixture of a token; per layer, the
    argmax at that layer. Ties go to the first expert.
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
    """Mean weight ``mean_{b,t,l} s[b,t,l,e]`` and dominant share of each expert over the real tokens."""
    s, w = _prepare(scalings, mask)
    E, L = s.shape[-1], s.shape[-2]
    experts, layers = _names("expert", E, expert_names), _names("layer", L, layer_names)

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
