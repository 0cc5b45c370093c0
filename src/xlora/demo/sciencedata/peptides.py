"""The peptide set for steered MD, simple sequence features, and the label-noise analysis.

Sequences are drawn reproducibly (``random.Random(seed)``) in five styles so the set varies in
composition: ``helix`` (Ala/Leu/Glu/Lys/Met/Gln/Arg), ``breaker`` (a third Pro/Gly), ``charged``
(Asp/Glu/Lys/Arg-rich), ``hydrophobic`` (Ala/Ile/Leu/Met/Phe/Val/Trp) and ``mixed`` (all 20), with
10–20 residues. The features the labels are compared with: length, mean helix propensity (Pace &
Scholtz 1998, kcal/mol relative to Ala: lower is more helical), net charge at pH 7 (K+R−D−E) and
GRAVY (Kyte–Doolittle mean hydropathy).
"""

from __future__ import annotations

import math
import random
import statistics

STYLES = {
    "helix": "AAALLEEKKMQR",
    "breaker": "PPGGAELKSTNDQ",
    "charged": "DEKRDEKRAQSN",
    "hydrophobic": "AILMFVWAILV",
    "mixed": "ACDEFGHIKLMNPQRSTVWY",
}
HELIX_PROPENSITY = {"A": 0.0, "L": 0.21, "R": 0.21, "M": 0.24, "K": 0.26, "Q": 0.39, "E": 0.40, "I": 0.41,
                    "W": 0.49, "S": 0.50, "Y": 0.53, "F": 0.54, "H": 0.61, "V": 0.61, "N": 0.65, "T": 0.66,
                    "C": 0.68, "D": 0.69, "G": 1.00, "P": 3.16}
KYTE_DOOLITTLE = {"A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2,
                  "I": 4.5, "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9,
                  "Y": -1.3, "V": 4.2}


def sequences(n: int, seed: int = 0, lengths: tuple[int, int] = (10, 20)) -> list[tuple[str, str]]:
    """``n`` distinct (sequence, style) pairs, styles in turn so any prefix of the list is varied."""
    rng = random.Random(seed)
    names = list(STYLES)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        style = names[len(out) % len(names)]
        seq = "".join(rng.choice(STYLES[style]) for _ in range(rng.randint(*lengths)))
        if seq not in seen:
            seen.add(seq)
            out.append((seq, style))
    return out


def features(seq: str) -> dict[str, float]:
    """Length, mean helix propensity (kcal/mol), net charge at pH 7 and GRAVY of ``seq``."""
    return {"length": float(len(seq)),
            "helix_propensity": sum(HELIX_PROPENSITY[a] for a in seq) / len(seq),
            "net_charge": float(sum(seq.count(a) for a in "KR") - sum(seq.count(a) for a in "DE")),
            "gravy": sum(KYTE_DOOLITTLE[a] for a in seq) / len(seq)}


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than 3 points."""
    if len(x) < 3:
        return math.nan
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _num(x: float) -> float | None:
    """``x`` rounded to 4 places, or None where it is not finite (so the summary is strict JSON)."""
    return round(x, 4) if math.isfinite(x) else None


def noise_summary(records: list[dict], labels: tuple[str, ...] = ("peak_force_pn", "work_kj_mol")) -> dict:
    """Seed noise against sequence spread, and correlations of the labels with sequence features.

    For every label: ``seed_sd`` is the pooled within-sequence SD over sequences with ≥ 2 seeds
    (variance ``w``), ``sequence_sd`` the SD of those sequences' means (variance ``m``). With ``k`` seeds
    per sequence, the variance due to the sequence is ``s = m − w/k``, and the reliability (intraclass
    correlation) of one pull's label is ``s / (s + w)``, of a ``k``-seed mean ``s / m`` (1 = noise-free,
    ≤ 0 = the sequence explains nothing measurable); and
    ``correlations`` the Pearson r of every sequence's mean label with each feature of ``features``.
    Undefined numbers (too few sequences, a constant feature) are None.
    """
    by_seq: dict[str, list[dict]] = {}
    for r in records:
        by_seq.setdefault(r["sequence"], []).append(r)
    multi = {s: rs for s, rs in by_seq.items() if len(rs) >= 2}
    out: dict = {"n_records": len(records), "n_sequences": len(by_seq), "n_multi_seed_sequences": len(multi),
                 "seeds_per_multi_sequence": round(statistics.fmean(len(v) for v in multi.values()), 3)
                 if multi else 0}
    for label in labels:
        entry: dict = {}
        if len(multi) >= 2:
            within = statistics.fmean(statistics.variance([r[label] for r in rs]) for rs in multi.values())
            means = [statistics.fmean(r[label] for r in rs) for rs in multi.values()]
            between = statistics.variance(means)
            k = out["seeds_per_multi_sequence"]
            signal = between - within / k
            entry.update(seed_sd=_num(math.sqrt(within)), sequence_sd=_num(math.sqrt(between)),
                         noise_ratio=_num(math.sqrt(within / between)) if between > 0 else None,
                         reliability_one_pull=_num(signal / (signal + within)) if signal + within > 0 else None,
                         reliability_seed_mean=_num(signal / between) if between > 0 else None)
        seq_means = {s: statistics.fmean(r[label] for r in rs) for s, rs in by_seq.items()}
        feats = {s: features(s) for s in seq_means}
        names = list(next(iter(feats.values()))) if feats else []
        entry["correlations"] = {f: _num(pearson([feats[s][f] for s in seq_means], list(seq_means.values())))
                                 for f in names}
        entry["mean"] = _num(statistics.fmean(seq_means.values())) if seq_means else None
        out[label] = entry
    return out
