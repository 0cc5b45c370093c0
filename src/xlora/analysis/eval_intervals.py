"""How sure is a difference? Paired bootstrap intervals of loss ratios, Wilson intervals of routing shares.

Loss ratio of row ``X`` over row ``Y`` on records ``R`` scored by both (a paired comparison: same records, same
tokens)::

    ρ = Σ_{r∈R} NLL_X(r) / Σ_{r∈R} NLL_Y(r)     (= the ratio of their token-weighted mean losses)

Interval: ``B`` resamples of the records with replacement *within each domain* (a split's mix of domains is
part of its design), drawn from numpy's PCG64 seeded with ``seed``; the ``(1 - level)/2`` and ``(1 + level)/2``
percentiles of the ``B`` ratios. Resample ``b`` is a count matrix ``C [B, n]`` (how often record ``r`` was drawn),
so ``ρ_b = (C x)_b / (C y)_b``. An interval wholly below 1 says ``X`` beats ``Y`` on these records beyond
the noise of which records were drawn (not beyond the noise of training: one model, one seed).

Top-1 own routing ``h`` of ``n`` records: the Wilson score interval at ``level``
``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``, ``p = h/n``, ``z`` the normal quantile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


@dataclass
class RecordLosses:
    """One scored record: where it came from, its domain, scored tokens and summed NLL per row."""

    where: str
    domain: str
    tokens: int
    nll: dict[str, float] = field(default_factory=dict)
    record_id: str | None = None
    top1: str | None = None  # X-LoRA's expert of largest mean scaling over the scored positions, when routed

    def to_json(self) -> dict[str, object]:
        return {"where": self.where, "id": self.record_id, "domain": self.domain, "tokens": self.tokens,
                "nll": self.nll, "top1": self.top1}


def resample_counts(domains: list[str], resamples: int, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` int64: how often each of the ``n`` records is drawn when each domain's records are
    resampled with replacement to that domain's size (rows sum to ``n``)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    counts = np.zeros((resamples, len(domains)), dtype=np.int64)
    labels = np.asarray(domains, dtype=object)
    for d in dict.fromkeys(domains):
        idx = np.flatnonzero(labels == d)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=resamples)
    return counts


def ratio_interval(x: np.ndarray, y: np.ndarray, counts: np.ndarray, level: float = LEVEL
                   ) -> tuple[float, float, float] | None:
    """``(Σx/Σy, low, high)``: the ratio of sums and its percentile interval over the resamples ``counts``
    ``[B, n]`` of the ``n`` paired values ``x``, ``y`` (resamples whose ``Σy`` is 0 are left out); ``None`` where
    no ratio is defined (``Σy = 0``, or in every resample), so that no NaN reaches the JSON."""
    sx, sy = counts @ x, counts @ y
    keep = sy > 0
    ratios = sx[keep] / sy[keep]
    if not len(ratios) or y.sum() <= 0:
        return None
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(x.sum() / y.sum()), float(low), float(high)


def loss_ratios(records: list[RecordLosses], ref: str, rows: list[str], resamples: int = RESAMPLES,
                seed: int = SEED, level: float = LEVEL) -> dict[str, dict[str, list[float]]]:
    """``out[row][domain or "mixed"] = [ρ, low, high]``: row ``ref``'s loss over ``row``'s on the records both
    scored (see the module docstring; a cell whose ``row`` loss sums to 0 is left out), resampled with the same seed for every row: the same resamples wherever
    the rows scored the same records (every row but the oracle, which leaves out domains naming no expert)."""
    out: dict[str, dict[str, list[float]]] = {}
    drawn: dict[tuple[str, ...], np.ndarray] = {}  # the resamples of each record set (the same for most rows)
    for row in rows:
        both = [r for r in records if ref in r.nll and row in r.nll]
        if row == ref or not both:
            continue
        domains = [r.domain for r in both]
        key = tuple(r.where for r in both)
        counts = drawn[key] if key in drawn else drawn.setdefault(key, resample_counts(domains, resamples, seed))
        x = np.array([r.nll[ref] for r in both], dtype=np.float64)
        y = np.array([r.nll[row] for r in both], dtype=np.float64)
        cells = {"mixed": ratio_interval(x, y, counts, level)}
        for d in dict.fromkeys(domains):
            m = np.array([dd == d for dd in domains])
            cells[d] = ratio_interval(x[m], y[m], counts[:, m], level)
        out[row] = {d: list(c) for d, c in cells.items() if c is not None}  # undefined cells left out
    return out


def wilson(hits: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a share ``hits / n`` at ``level`` (``(0, 1)`` for ``n = 0``)."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = hits / n, z * z
    centre, half = p + z2 / (2 * n), z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    low, high = (centre - half) / (1 + z2 / n), (centre + half) / (1 + z2 / n)
    return (0.0 if hits == 0 else low), (1.0 if hits == n else high)  # exact ends where rounding would miss them


def intervals(records: list[RecordLosses], ref: str, rows: list[str], hits: dict[str, int], counts: dict[str, int],
              resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, object]:
    """The ``intervals`` of an ``xlora-eval/1`` result: ``loss_ratio`` (:func:`loss_ratios` of ``ref`` over
    every other row) and ``top1_own`` (``[low, high]`` per domain, :func:`wilson`), with the method's settings."""
    return {"level": level, "resamples": resamples, "seed": seed, "reference": ref,
            "method": "paired bootstrap over records, stratified by domain (loss ratios); Wilson (top-1 own)",
            "loss_ratio": loss_ratios(records, ref, rows, resamples, seed, level),
            "top1_own": {d: list(wilson(hits[d], counts[d], level)) for d in hits}}


def ratio_markdown(spans: dict[str, object] | None, cols: list[str]) -> str:
    """The loss-ratio table of :func:`intervals` (``cols``: the domains and ``mixed``), or ``""``."""
    if not spans or not spans["loss_ratio"]:
        return ""
    ratios: dict[str, dict[str, list[float]]] = spans["loss_ratio"]  # type: ignore[assignment]
    head = (f"\n{spans['reference']}'s loss over each row's, with its {spans['level']:.0%} interval (paired bootstrap "
            f"over records, stratified by domain, {spans['resamples']} resamples); below 1: {spans['reference']} "
            "is better, and an interval wholly below 1 says so beyond the draw of records:\n\n"
            "| row | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n")
    lines = []
    for row, cells in ratios.items():
        text = [f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]" if d in cells and (c := cells[d]) else "" for d in cols]
        lines.append(f"| {row} | " + " | ".join(text) + " |")
    return head + "\n".join(lines) + "\n"


def read_records(path: str) -> list[RecordLosses]:
    """The lines of an ``eval_records.jsonl`` (written by ``EvalResult.write``) as :class:`RecordLosses`."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            out.append(RecordLosses(r["where"], r["domain"], int(r["tokens"]), dict(r["nll"]), r.get("id"), r.get("top1")))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {n} is not an eval_records.jsonl line ({e}); write it with xlora eval") from None
    return out


def paired_runs(a: list[RecordLosses], b: list[RecordLosses], row: str = "xlora", resamples: int = RESAMPLES,
                seed: int = SEED, level: float = LEVEL) -> dict[str, list[float]]:
    """Two evaluations of the same records (two models, say a shallow head and the full one): ``row``'s loss in
    ``a`` over its loss in ``b``, ``[ρ, low, high]`` per domain and ``mixed`` (:func:`loss_ratios`). Records are
    matched by ``where``; both runs must have scored the same records with the same tokens."""
    pairs = []
    for r, other in _matched(a, b):
        if other.tokens != r.tokens or row not in r.nll or row not in other.nll:
            raise ValueError(f"{r.where}: the runs differ in scored tokens ({r.tokens} vs {other.tokens}) or lack "
                             f"row {row!r}; compare runs of one tokenizer and data, both with that row")
        pairs.append(RecordLosses(r.where, r.domain, r.tokens, {"a": r.nll[row], "b": other.nll[row]}))
    return loss_ratios(pairs, "a", ["b"], resamples, seed, level)["b"]


def routing_difference(a: list[RecordLosses], b: list[RecordLosses], resamples: int = RESAMPLES, seed: int = SEED,
                       level: float = LEVEL) -> dict[str, list[float]]:
    """Two evaluations of the same records: top-1 own routing of ``a`` minus that of ``b`` per domain,
    ``[Δ, low, high]``, the interval from the same paired resamples of each domain's records (a record whose
    top-1 is its own domain's expert counts 1; the mean is :func:`ratio_interval` of the differences over ones).
    Domains whose records have no ``top1`` in both runs are left out."""
    both = [(r, o) for r, o in _matched(a, b) if r.top1 is not None and o.top1 is not None]
    out: dict[str, list[float]] = {}
    for d in dict.fromkeys(r.domain for r, _ in both):
        delta = np.array([(r.top1 == d) - (o.top1 == d) for r, o in both if r.domain == d], dtype=np.float64)
        counts = resample_counts([d] * len(delta), resamples, seed)
        if (cell := ratio_interval(delta, np.ones_like(delta), counts, level)) is not None:
            out[d] = list(cell)
    return out


def _matched(a: list[RecordLosses], b: list[RecordLosses]) -> list[tuple[RecordLosses, RecordLosses]]:
    """``a``'s records each with ``b``'s of the same ``where``; an error unless both scored the same records once."""
    by_where = {r.where: r for r in b}
    if len(by_where) != len(b) or len({r.where for r in a}) != len(a) or {r.where for r in a} != set(by_where):
        raise ValueError("the two evaluations did not score the same records (their 'where' differ): run both on "
                         "the same --data files")
    return [(r, by_where[r.where]) for r in a]


def records_file(run: str | Path, split: str | None = None) -> Path:
    """``eval_records.jsonl`` of an ``xlora eval`` output folder (or of its ``split`` subfolder)."""
    folder = Path(run) / split if split else Path(run)
    path = folder / "eval_records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no eval_records.jsonl: give folders written by xlora eval --out "
                                "(this version or later)" + (f", each with a {split}/ subfolder" if split else ""))
    return path


def compare_runs(a: str | Path, b: str | Path, splits: list[str] | None = None, row: str = "xlora",
                 resamples: int = RESAMPLES) -> str:
    """The ``xlora compare A B`` table: per split and domain, ``row``'s loss in run ``a`` over its loss in run ``b``
    (:func:`paired_runs`) and X-LoRA's top-1 own routing in ``a`` minus ``b``'s (:func:`routing_difference`), each with
    its paired interval. Both runs must have scored the same records (e.g. two models on the same ``--data``)."""
    lines = [f"A = {a}\nB = {b}\n\n{row}'s loss in A over its loss in B, and X-LoRA's top-1 own routing in A minus B's, with "
             f"{LEVEL:.0%} paired intervals ({resamples} resamples over records, stratified by domain); a loss interval "
             "wholly below 1 says A is better on these records:\n",
             "| split | domain | loss A / B | top-1 own A − B |", "|---|---|---:|---:|"]
    for split in splits or [None]:
        ra, rb = read_records(str(records_file(a, split))), read_records(str(records_file(b, split)))
        ratio, routing = paired_runs(ra, rb, row, resamples), routing_difference(ra, rb, resamples)
        for d, (r, lo, hi) in ratio.items():
            diff = routing.get(d)
            cell = f"{diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]" if diff else ""
            lines.append(f"| {split or '-'} | {d} | {r:.3f} [{lo:.3f}, {hi:.3f}] | {cell} |")
    return "\n".join(lines) + "\n"
