"""Numeric answers as a regression: R² and MAE of the parsed answers per task, against predicting the mean.

A record is numeric when its ``check`` has ``rel_tol`` or ``abs_tol``; its group is ``task`` (else its
``domain``), with ``/<meta.property>`` appended when the record names one (a gap and a dipole are not one
regression). Over the ``n_parsed`` answers of a group that contain a number (``ŷ``) and their references ``y``:

    MAE      = mean |y - ŷ|
    MAE_mean = mean |y - ȳ|                 (the MAE of always answering the references' mean ȳ)
    R²       = 1 - Σ (y - ŷ)² / Σ (y - ȳ)²  (0: as good as answering ȳ; < 0: worse)

R² is ``None`` below :data:`MIN_PARSED` parsed answers or when every reference is equal. Answers without a
number are not in the fit; ``n_parsed`` of ``n`` says how many there were (their task score is 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xlora.analysis.eval_data import first_number, reference_answer

MIN_PARSED = 3


def numeric_group(record: dict[str, Any]) -> str | None:
    """The regression group of ``record`` (see the module doc), or ``None`` when its check is not numeric."""
    check = record.get("check") or {}
    if not isinstance(check, dict) or ("rel_tol" not in check and "abs_tol" not in check):
        return None
    task = record.get("task") or record.get("domain") or "unlabelled"
    meta = record.get("meta")
    prop = meta.get("property") if isinstance(meta, dict) else None
    return f"{task}/{prop}" if prop else str(task)


def fit_stats(pairs: Sequence[tuple[float, float]], n: int) -> dict[str, Any]:
    """``{"n", "n_parsed", "mae", "mae_mean", "r2"}`` of ``(reference, answer)`` pairs (``n``: answers asked)."""
    k = len(pairs)
    if k == 0:
        return {"n": n, "n_parsed": 0, "mae": None, "mae_mean": None, "r2": None}
    ys = [y for y, _ in pairs]
    mean = sum(ys) / k
    sse = sum((y - p) ** 2 for y, p in pairs)
    sst = sum((y - mean) ** 2 for y in ys)
    r2 = 1.0 - sse / sst if k >= MIN_PARSED and sst > 0 else None
    return {"n": n, "n_parsed": k, "mae": sum(abs(y - p) for y, p in pairs) / k,
            "mae_mean": sum(abs(y - mean) for y in ys) / k, "r2": r2}


def numeric_fit(records: Sequence[dict[str, Any]], answers: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """Per numeric group of ``records`` (raw records), the fit of ``answers`` (``None``: not answered by this
    row, left out of ``n``); ``{}`` when no record is numeric."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    asked: dict[str, int] = {}
    for rec, answer in zip(records, answers):
        group = numeric_group(rec)
        want = first_number(reference_answer(rec)) if group is not None else None
        if group is None or want is None or answer is None:
            continue
        asked[group] = asked.get(group, 0) + 1
        got = first_number(answer)
        if got is not None:
            pairs.setdefault(group, []).append((want, got))
    return {g: fit_stats(pairs.get(g, []), n) for g, n in sorted(asked.items())}


def numeric_markdown(configs: dict[str, dict[str, Any]]) -> str:
    """A table: one row per configuration, one column per group, ``R² (MAE)``; empty when nothing is numeric."""
    groups = sorted({g for c in configs.values() for g in (c.get("numeric") or {})})
    if not groups:
        return ""
    out = ["\nNumeric answers (R² of the parsed answers, 0 = answering the mean; MAE in parentheses; "
           "parsed/asked under the name):\n\n", "| configuration | " + " | ".join(groups) + " |\n",
           "|---|" + "---:|" * len(groups) + "\n"]
    for row, c in configs.items():
        fits = c.get("numeric") or {}
        cells = []
        for g in groups:
            f = fits.get(g)
            if f is None or f["n_parsed"] == 0:
                cells.append("–" if f is None else f"no number (0/{f['n']})")
                continue
            r2 = "n/a" if f["r2"] is None else f"{f['r2']:.2f}" if abs(f["r2"]) < 1e4 else f"{f['r2']:.2g}"
            cells.append(f"{r2} ({f['mae']:.3g}) {f['n_parsed']}/{f['n']}")
        out.append(f"| {row} | " + " | ".join(cells) + " |\n")
    return "".join(out)
