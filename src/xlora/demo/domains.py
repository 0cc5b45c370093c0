"""Seeded scientific task generators and their checkers: the demo's four expert domains in miniature.

Domains (the X-LoRA paper's case studies, scaled down to a 135M model and minutes of CPU):

- ``protein``: random amino-acid sequences; *forward* tasks ask for a property computed with
  Biopython's ``ProteinAnalysis`` (molecular weight, isoelectric point, GRAVY, instability index);
  *inverse* tasks ask for a sequence of a given length whose property lies in ``[a, b]``.
- ``chemistry``: small real molecules plus deterministic enumerations (chains, substituted benzenes,
  pyridines, rings); *forward*: RDKit's MolWt, Crippen logP, ring count, H-bond donors/acceptors;
  *inverse*: "propose a valid molecule with ...", checked with RDKit.
- ``mathematics``: arithmetic, modulo, fractions and linear equations with exact answers.
- ``general``: short instruction following with deterministic answers (capitals, antonyms, case,
  sorting, counting, dates, numbers in words) so the mixture keeps its manners.

A record is ``{"id", "domain", "task", "split", "prompt", "completion", "meta"}``; ``meta`` holds what
:func:`check` needs. Records of different splits never share an *item*: every record has a key (the
molecule, the sequence or the prompt) and ``sha256(domain:key)`` assigns it to one split, so test
molecules are unseen in training. Everything is a pure function of ``(domain, split, n, seed)``.

Scores are in ``[0, 1]``: forward numeric tasks give ``max(0, 1 - |pred - true| / tol)`` (1 for the
exact rounded value), count/exact tasks 1 or 0. Inverse tasks give 0 for an answer that is not a
sequence / molecule, 0.25 for an amino-acid sequence of the wrong length, 0.5 for a valid answer
whose property misses the range and 1 for a hit.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from xlora.demo._domain_data import ANTONYMS, CAPITALS, DAYS, MONTHS, WORDS, number_words
from xlora.demo.science import chem_property, mol_from_smiles, molecule_pool, protein_property

DOMAINS = ("protein", "chemistry", "mathematics", "general")
SPLITS = ("train", "validation", "test")
_SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}  # of 20
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_LEADING_NUMBER = re.compile(r"(?:x\s*=\s*)?([-+]?\d+(?:\.\d+)?(?:/\d+)?)(?![\w.]*\d)")

Record = dict[str, Any]
Task = Callable[[random.Random], tuple[str, str, str, dict[str, Any]]]  # -> key, prompt, completion, meta


def split_of(domain: str, key: str) -> str:
    """The split an item belongs to: 80 % train, 10 % validation, 10 % test, by a hash of ``domain:key``."""
    bucket = int(hashlib.sha256(f"{domain}:{key}".encode()).hexdigest()[:8], 16) % 20
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def _fmt(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never "-0.00"


def _numeric(value: float, decimals: int, tol: float) -> tuple[str, dict[str, Any]]:
    """Completion text and checker meta of a numeric forward task (``tol``: error at which the score is 0)."""
    text = _fmt(value, decimals)
    return text, {"kind": "numeric", "value": float(text), "decimals": decimals, "tol": tol}


# ------------------------------------------------------------------------------------------ protein
_PROTEIN_PROPS = {  # name in prompts, decimals, tolerance (absolute; mw relative)
    "mw": ("molecular weight in Da", 1, 0.05),
    "pi": ("isoelectric point (pI)", 2, 1.0),
    "gravy": ("GRAVY (grand average of hydropathy)", 3, 0.5),
    "instability": ("instability index", 2, 20.0),
}


def _random_sequence(rng: random.Random, lo: int = 8, hi: int = 24) -> str:
    return "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(lo, hi)))


def _protein_forward(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    seq, prop = _random_sequence(rng), rng.choice(list(_PROTEIN_PROPS))
    name, decimals, tol = _PROTEIN_PROPS[prop]
    value = protein_property(seq, prop)
    text, meta = _numeric(value, decimals, tol * value if prop == "mw" else tol)
    return seq, f"What is the {name} of the protein sequence {seq}? Give {decimals} decimals.", text, meta


_INVERSE_WIDTH = {"mw": 200.0, "pi": 1.0, "gravy": 0.6}


def _protein_inverse(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    seq, prop = _random_sequence(rng), rng.choice(list(_INVERSE_WIDTH))
    value, width = protein_property(seq, prop), _INVERSE_WIDTH[prop]
    lo = round(value - rng.uniform(0.1, 0.9) * width, 1)
    hi = round(lo + width, 1)
    name = _PROTEIN_PROPS[prop][0]
    prompt = f"Write a protein sequence of exactly {len(seq)} residues with {name} between {lo:g} and {hi:g}."
    meta = {"kind": "protein_inverse", "property": prop, "lo": lo, "hi": hi, "length": len(seq)}
    return prompt, prompt, seq, meta


def _check_protein_inverse(meta: dict[str, Any], answer: str) -> float:
    seq = _first_token(answer).upper()
    if not seq or any(c not in AMINO_ACIDS for c in seq):
        return 0.0
    if len(seq) != meta["length"]:
        return 0.25
    return 1.0 if meta["lo"] <= protein_property(seq, meta["property"]) <= meta["hi"] else 0.5


# ---------------------------------------------------------------------------------------- chemistry
_CHEM_FORWARD = {  # prompt wording, decimals (None = integer count), tolerance
    "mw": ("What is the molecular weight in g/mol of the molecule {s}? Give 2 decimals.", 2, 0.05),
    "logp": ("What is the Crippen logP of the molecule {s}? Give 2 decimals.", 2, 1.0),
    "rings": ("How many rings does the molecule {s} have?", None, 0),
    "hbd": ("How many hydrogen-bond donors does the molecule {s} have?", None, 0),
    "hba": ("How many hydrogen-bond acceptors does the molecule {s} have?", None, 0),
}


def _chem_forward(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    smiles, prop = rng.choice(molecule_pool()), rng.choice(list(_CHEM_FORWARD))
    template, decimals, tol = _CHEM_FORWARD[prop]
    value = chem_property(mol_from_smiles(smiles), prop)
    if decimals is None:
        text, meta = str(int(value)), {"kind": "exact_int", "value": int(value)}
    else:
        text, meta = _numeric(value, decimals, tol * value if prop == "mw" else tol)
    return smiles, template.format(s=smiles), text, meta


def _chem_inverse(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    smiles, prop = rng.choice(molecule_pool()), rng.choice(["mw", "logp", "rings", "hbd"])
    value = chem_property(mol_from_smiles(smiles), prop)
    if prop in ("rings", "hbd"):
        lo = hi = int(value)
        noun = "ring" if prop == "rings" else "hydrogen-bond donor"
        what = f"exactly {lo} {noun}{'s' if lo != 1 else ''}"
    else:
        width = 40.0 if prop == "mw" else 1.0
        lo = round(value - rng.uniform(0.1, 0.9) * width, 1)
        hi = round(lo + width, 1)
        what = f"{'molecular weight' if prop == 'mw' else 'logP'} between {lo:g} and {hi:g}"
        what += " g/mol" if prop == "mw" else ""
    prompt = f"Propose a valid molecule, as SMILES, with {what}."
    return prompt, prompt, smiles, {"kind": "chem_inverse", "property": prop, "lo": lo, "hi": hi}


def _check_chem_inverse(meta: dict[str, Any], answer: str) -> float:
    mol = mol_from_smiles(_first_token(answer))
    if mol is None or mol.GetNumAtoms() == 0:
        return 0.0
    return 1.0 if meta["lo"] <= chem_property(mol, meta["property"]) <= meta["hi"] else 0.5


# -------------------------------------------------------------------------------------- mathematics
def _math_task(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    kind = rng.choice(["add", "sub", "mul", "expr", "mod", "frac", "linear"])
    if kind in ("add", "sub"):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        op, value = ("+", a + b) if kind == "add" else ("-", a - b)
        prompt = f"What is {a} {op} {b}?"
    elif kind == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 30)
        prompt, value = f"What is {a} * {b}?", a * b
    elif kind == "expr":
        a, b, c, d = (rng.randint(1, 20) for _ in range(4))
        prompt, value = f"Compute ({a} + {b}) * {c} - {d}.", (a + b) * c - d
    elif kind == "mod":
        a, b = rng.randint(20, 500), rng.randint(3, 15)
        prompt, value = f"What is the remainder of {a} divided by {b}?", a % b
    elif kind == "frac":
        den = rng.randint(2, 12)
        num, k = rng.randint(1, 3 * den), rng.randint(2, 9)
        frac = Fraction(num, den)
        prompt = f"Simplify the fraction {num * k}/{den * k}."
        text = str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"
        return prompt, prompt, text, {"kind": "exact_number", "value": str(frac)}
    else:
        x, a, b = rng.randint(-12, 12), rng.randint(2, 9), rng.randint(-30, 30)
        c = a * x + b
        sign = "+" if b >= 0 else "-"
        prompt = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
        return prompt, prompt, f"x = {x}", {"kind": "exact_number", "value": str(x)}
    return prompt, prompt, str(value), {"kind": "exact_number", "value": str(value)}


# ------------------------------------------------------------------------------------------ general
def _general_task(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    kind = rng.choice(["capital", "antonym", "upper", "sort", "count", "next", "date", "words"])
    exact = "exact_text"
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        prompt, answer = f"What is the capital of {country}? Answer with the city name only.", CAPITALS[country]
    elif kind == "antonym":
        word = rng.choice(sorted(ANTONYMS))
        prompt, answer = f"Give the opposite of the word '{word}'. One word.", ANTONYMS[word]
    elif kind == "upper":
        word = rng.choice(WORDS)
        prompt, answer, exact = f"Write the word '{word}' in capital letters.", word.upper(), "exact_case"
    elif kind == "sort":
        words = rng.sample(WORDS, rng.randint(3, 5))
        prompt, answer = f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))
    elif kind == "count":
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        prompt, answer = f"How many words are in this text: \"{' '.join(words)}\"?", str(len(words))
    elif kind == "next":
        seq = rng.choice([DAYS, MONTHS])
        i = rng.randrange(len(seq))
        prompt, answer = f"Which {'day' if seq is DAYS else 'month'} comes after {seq[i]}?", seq[(i + 1) % len(seq)]
    elif kind == "date":
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        prompt, answer = f"Rewrite the date {y}-{m:02d}-{d:02d} in DD/MM/YYYY format.", f"{d:02d}/{m:02d}/{y}"
    else:
        n = rng.randint(1, 999)
        prompt, answer = f"Write the number {n} in English words.", number_words(n)
    return prompt, prompt, answer, {"kind": exact, "value": answer}


TASKS: dict[str, list[tuple[str, Task, float]]] = {  # domain -> (task name, generator, weight)
    "protein": [("protein_forward", _protein_forward, 0.7), ("protein_inverse", _protein_inverse, 0.3)],
    "chemistry": [("chem_forward", _chem_forward, 0.7), ("chem_inverse", _chem_inverse, 0.3)],
    "mathematics": [("math", _math_task, 1.0)],
    "general": [("general", _general_task, 1.0)],
}


def generate(domain: str, split: str, n: int, seed: int = 0) -> list[Record]:
    """``n`` distinct records of ``domain`` in ``split``; a pure function of the arguments.

    Raises:
        ValueError: unknown domain or split, or fewer than ``n`` distinct records exist in the split.
    """
    if domain not in TASKS:
        raise ValueError(f"domain {domain!r} is unknown; choose one of {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"xlora-domains:{seed}:{domain}:{split}")
    names, funcs, weights = zip(*TASKS[domain])
    records: list[Record] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"only {len(records)} distinct {domain!r} records exist in split {split!r} "
                             f"(asked for n={n}); ask for fewer")
        i = rng.choices(range(len(names)), weights)[0]
        key, prompt, completion, meta = funcs[i](rng)
        if prompt in seen or split_of(domain, key) != split:
            continue
        seen.add(prompt)
        records.append({"id": f"{domain}-{split}-{seed}-{len(records)}", "domain": domain, "task": names[i],
                        "split": split, "prompt": prompt, "completion": completion, "meta": meta})
    return records


def generate_mixture(split: str, n_per_domain: int, seed: int = 0,
                     domains: tuple[str, ...] | list[str] = DOMAINS) -> list[Record]:
    """``n_per_domain`` records of each domain, interleaved round-robin (domain order fixed)."""
    per = [generate(d, split, n_per_domain, seed) for d in domains]
    return [recs[i] for i in range(n_per_domain) for recs in per]


# ----------------------------------------------------------------------------------------- checking
def _first_token(answer: str) -> str:
    line = next((ln for ln in answer.strip().splitlines() if ln.strip()), "")
    token = line.strip().strip("`'\"").split()[0] if line.strip().strip("`'\"") else ""
    return token.strip("`'\"").rstrip(".,;")


def _leading_number(answer: str) -> str | None:
    """The number the answer starts with (after an optional ``x =``), or ``None``: garbage that merely
    contains a digit somewhere earns nothing."""
    m = _LEADING_NUMBER.match(answer.strip().strip("`'\"").replace(",", ""))
    return m.group(1) if m else None


def _normalise(text: str) -> str:
    return " ".join(text.strip().strip("`'\"").rstrip(".").split()).lower()


def check(record: Record, answer: str) -> float:
    """Score ``answer`` (the model's completion text) for ``record``, in ``[0, 1]`` (see the module doc)."""
    meta, kind = record["meta"], record["meta"]["kind"]
    if kind == "numeric":
        num = _leading_number(answer)
        if num is None or "/" in num:
            return 0.0
        err = abs(float(num) - meta["value"])
        if err <= 0.5 * 10 ** -meta["decimals"]:
            return 1.0
        return max(0.0, 1.0 - err / meta["tol"]) if meta["tol"] > 0 else 0.0
    if kind in ("exact_int", "exact_number"):
        num = _leading_number(answer)
        return float(num is not None and Fraction(num) == Fraction(str(meta["value"])))
    if kind == "exact_case":
        return float(answer.strip().strip("`'\"").rstrip(".") == meta["value"])
    if kind == "exact_text":
        return float(_normalise(answer) == _normalise(meta["value"]))
    if kind == "protein_inverse":
        return _check_protein_inverse(meta, answer)
    if kind == "chem_inverse":
        return _check_chem_inverse(meta, answer)
    raise ValueError(f"record {record.get('id')!r} has meta kind {kind!r}, which no checker handles")

