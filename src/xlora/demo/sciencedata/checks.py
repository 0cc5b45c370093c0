"""Physics checkers for inverse tasks: compute the property of a model's answer and score it.

``check_molecule_property(answer, prop, lo, hi)`` takes a proposed molecule of the shipped table at its
stored value and runs the data's RDKit + GFN2-xTB pipeline on any other, from its canonical SMILES
(``molecules.checked_properties``); ``check_peptide_force(answer, lo, hi,
time_budget_s)`` runs one steered pull (``mechanics.pull``) on the proposed peptide. Both return a
``Check``: ``score`` 1.0 when the value lies in ``[lo, hi]``, falling linearly to 0 at one range
width outside it; 0.0 with the reason shown when the answer cannot be read, cannot be computed
(metal, radical, …), blows up or runs past the time budget.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

MOLECULE_PROPERTIES = ("homo_ev", "lumo_ev", "gap_ev", "dipole_debye")
PEPTIDE_PROPERTIES = ("peak_force_pn", "work_kj_mol")
MAX_PEPTIDE_LENGTH = 30


@dataclass(frozen=True)
class Check:
    """A checked answer: ``score`` in [0, 1], the computed ``value`` (None if none) and a ``reason``."""

    score: float
    reason: str
    value: float | None = None
    answer: str | None = None


def range_score(value: float, lo: float, hi: float) -> float:
    """1 inside ``[lo, hi]``, then linearly down to 0 at one range width (``hi - lo``) outside it."""
    width = hi - lo
    distance = max(lo - value, value - hi, 0.0)
    return 1.0 if distance == 0 else max(0.0, 1.0 - distance / width)


def _check_range(prop: str, allowed: tuple[str, ...], lo: float, hi: float) -> None:
    if prop not in allowed:
        raise ValueError(f"prop={prop!r}: use one of {', '.join(allowed)}")
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
        raise ValueError(f"range lo={lo!r}, hi={hi!r}: give two numbers with lo < hi")


def _scored(value: float, prop: str, lo: float, hi: float, answer: str) -> Check:
    score = range_score(value, lo, hi)
    where = "inside" if score == 1.0 else "outside"
    return Check(score, f"{prop} = {value:.4g}, {where} [{lo:g}, {hi:g}]", value, answer)


def _smiles_candidates(answer: str) -> list[str]:
    """Whitespace-separated tokens stripped of quotes and punctuation, longest first (ties: the later).

    RDKit reads a SMILES up to the first space (the rest is a name), so a sentence is never tried
    whole: "I propose ethanol: CCO" must give CCO, not hydrogen iodide.
    """
    tokens = [t.strip("`'\",;:").rstrip(".") for t in answer.split()]
    order = sorted(range(len(tokens)), key=lambda i: (-len(tokens[i]), -i))
    return [tokens[i] for i in order if tokens[i]]


def check_molecule_property(answer: str, prop: str, lo: float, hi: float) -> Check:
    """Score a proposed molecule (SMILES, possibly inside a sentence) on a GFN2-xTB property range."""
    from xlora.demo.sciencedata import molecules

    _check_range(prop, MOLECULE_PROPERTIES, lo, hi)
    if not isinstance(answer, str) or not answer.strip():
        return Check(0.0, "unparsable: empty answer", None, answer)
    for candidate in _smiles_candidates(answer):
        try:
            props, where = molecules.checked_properties(candidate)  # the shipped row, else xTB on the canonical SMILES
        except molecules.Skip as exc:
            if str(exc).startswith("parse:"):  # not a SMILES RDKit reads: the next token
                continue
            return Check(0.0, f"not computable: {exc}", None, candidate)
        checked = _scored(props[prop], prop, lo, hi, props["smiles"])
        source = "the shipped value" if where == "table" else "GFN2-xTB now"
        return dataclasses.replace(checked, reason=f"{checked.reason} ({source})")
    return Check(0.0, f"unparsable: no SMILES RDKit can read in {answer[:80]!r}", None, answer)


def _peptide_candidate(answer: str) -> str | None:
    """The longest run of ≥ 2 capital one-letter codes, or the whole answer if it is one such word in lower
    case; None otherwise (so English like "no idea", all amino-acid letters, is not a peptide)."""
    from xlora.demo.sciencedata.mechanics import AMINO_ACIDS

    runs = re.findall(rf"\b[{AMINO_ACIDS}]{{2,}}\b", answer)
    if runs:
        return max(runs, key=len)
    word = answer.strip().strip("`'\".")
    return word.upper() if re.fullmatch(rf"[{AMINO_ACIDS.lower()}]{{2,}}", word) else None


def check_peptide_force(answer: str, lo: float, hi: float, time_budget_s: float, prop: str = "peak_force_pn",
                        seed: int = 1, protocol=None) -> Check:
    """Score a proposed peptide (one-letter code) by one steered-MD pull within ``time_budget_s`` seconds."""
    from xlora.demo.sciencedata.mechanics import OverBudget, SimulationFailed, pull

    _check_range(prop, PEPTIDE_PROPERTIES, lo, hi)
    seq = _peptide_candidate(answer) if isinstance(answer, str) else None
    if seq is None:
        return Check(0.0, f"unparsable: no one-letter peptide sequence in {str(answer)[:80]!r}", None, answer)
    if not 2 <= len(seq) <= MAX_PEPTIDE_LENGTH:
        return Check(0.0, f"not computable: {len(seq)} residues, the checker simulates 2–{MAX_PEPTIDE_LENGTH}",
                     None, seq)
    try:
        record = pull(seq, seed, protocol, time_budget_s=time_budget_s)
    except OverBudget as exc:
        return Check(0.0, f"over budget: {exc}", None, seq)
    except SimulationFailed as exc:
        return Check(0.0, f"not computable: simulation blew up ({exc})", None, seq)
    return _scored(record[prop], prop, lo, hi, seq)
