"""Seeded scientific task generators and their checkers: the demo's five expert domains in miniature.

Domains (the X-LoRA paper's case studies, scaled down to a 135M model and minutes of CPU):

- ``protein``: random sequences; *forward*: a Biopython ``ProteinAnalysis`` property (weight, pI, GRAVY,
  instability); *inverse*: a sequence of a given length whose property lies in ``[a, b]``.
- ``chemistry``: real molecules and enumerations; *forward*: RDKit's MolWt, Crippen logP, rings, H-bond
  donors/acceptors; *inverse*: "propose a valid molecule with ...", checked with RDKit.
- ``mathematics``: arithmetic, modulo, fractions and linear equations with exact answers.
- ``general``: short instructions with deterministic answers (capitals, antonyms, case, sorting,
  counting, dates, numbers in words) so the mixture keeps its manners.
- ``graph``: passages about materials, proteins and mechanics (:mod:`xlora.demo.ontology`) -> their
  ``subject | relation | object`` triples (:mod:`xlora.demo.triples`), scored by F1.

A record is ``{"id", "domain", "task", "split", "item", "template", "prompt", "completion", "meta"}``;
``meta`` holds what :func:`check` needs. Records of different splits never share an *item*: every item has a key
(the molecule, the sequence, or the item in its original wording) and ``sha256(domain:key)`` assigns it
to one split, so test molecules are unseen in training; graph test passages use held-out entities and
sentence shapes. The prompt's wording is one of the item kind's phrasings (:mod:`xlora.demo.phrasings`):
``train``, ``validation`` and ``test`` use the seen ones, ``test_unseen`` asks the test items with
phrasings that no other split uses. Everything is a pure function of ``(domain, split, n, seed)``.

Scores are in ``[0, 1]``: forward numeric tasks give ``max(0, 1 - |pred - true| / tol)`` (1 for the
exact rounded value), count/exact tasks 1 or 0. Inverse tasks give 0 for an answer that is not a
sequence / molecule, 0.25 for an amino-acid sequence of the wrong length, 0.5 for a valid answer
whose property misses the range and 1 for a hit; graph answers their triple F1.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from xlora.demo import phrasings
from xlora.demo._domain_data import ANTONYMS, CAPITALS, DAYS, MONTHS, WORDS, number_words
from xlora.demo.ontology import passage
from xlora.demo.phrasings import Item
from xlora.demo.science import chem_property, mol_from_smiles, molecule_pool, protein_property
from xlora.demo.triples import format_triples, parse_triples, prf

DOMAINS = ("protein", "chemistry", "mathematics", "general", "graph")
SPLITS = phrasings.SPLITS
_SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}  # of 20
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_LEADING_NUMBER = re.compile(r"(?:[A-Za-z]\s*=\s*)?([-+]?\d+(?:\.\d+)?(?:/\d+)?)(?![\w.]*\d)")

Record = dict[str, Any]
Task = Callable[[random.Random, bool], Item]  # (rng, held_out) -> item


def split_of(domain: str, key: str) -> str:
    """The split an item belongs to: 80 % train, 10 % validation, 10 % test, by a hash of ``domain:key``."""
    bucket = int(hashlib.sha256(f"{domain}:{key}".encode()).hexdigest()[:8], 16) % 20
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def _fmt(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # never "-0.00"


def numeric_answer(value: float, decimals: int, tol: float) -> tuple[str, dict[str, Any]]:
    """Completion text and checker meta of a numeric forward task (``tol``: error at which the score is 0)."""
    text = _fmt(value, decimals)
    return text, {"kind": "numeric", "value": float(text), "decimals": decimals, "tol": tol}


# ------------------------------------------------------------------------------------------ protein
PROTEIN_PROPS = {  # long name (the original wording), short name, decimals, tolerance (absolute; mw relative)
    "mw": ("molecular weight in Da", "molecular weight", 1, 0.05),
    "pi": ("isoelectric point (pI)", "isoelectric point", 2, 1.0),
    "gravy": ("GRAVY (grand average of hydropathy)", "GRAVY score", 3, 0.5),
    "instability": ("instability index", "instability index", 2, 20.0),
}


def _random_sequence(rng: random.Random, lo: int = 8, hi: int = 24) -> str:
    return "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(lo, hi)))


def protein_forward_task(rng: random.Random, held_out: bool) -> Item:
    seq, prop = _random_sequence(rng), rng.choice(list(PROTEIN_PROPS))
    long, short, decimals, tol = PROTEIN_PROPS[prop]
    value = protein_property(seq, prop)
    text, meta = numeric_answer(value, decimals, tol * value if prop == "mw" else tol)
    return Item(seq, "protein_forward", {"seq": seq, "long": long, "short": short, "decimals": decimals, "x": seq,
                                         "prop": prop, "unit": "Da" if prop == "mw" else ""}, text, meta)


_INVERSE_WIDTH = {"mw": 200.0, "pi": 1.0, "gravy": 0.6}


def protein_inverse_task(rng: random.Random, held_out: bool) -> Item:
    seq, prop = _random_sequence(rng), rng.choice(list(_INVERSE_WIDTH))
    value, width = protein_property(seq, prop), _INVERSE_WIDTH[prop]
    lo = round(value - rng.uniform(0.1, 0.9) * width, 1)
    hi = round(lo + width, 1)
    long, short = PROTEIN_PROPS[prop][:2]
    slots = {"n": len(seq), "long": long, "short": short, "lo": f"{lo:g}", "hi": f"{hi:g}", "prop": prop,
             "unit": "Da" if prop == "mw" else ""}
    meta = {"kind": "protein_inverse", "property": prop, "lo": lo, "hi": hi, "length": len(seq)}
    return Item(phrasings.templates("protein_inverse")[0].format(**slots), "protein_inverse", slots, seq, meta)


def _check_protein_inverse(meta: dict[str, Any], answer: str) -> float:
    seq = _first_token(answer).upper()
    if not seq or any(c not in AMINO_ACIDS for c in seq):
        return 0.0
    if len(seq) != meta["length"]:
        return 0.25
    return 1.0 if meta["lo"] <= protein_property(seq, meta["property"]) <= meta["hi"] else 0.5


# ---------------------------------------------------------------------------------------- chemistry
CHEM_FORWARD = {  # long name, short name (values) or noun (counts), decimals (None = count), tolerance
    "mw": ("molecular weight in g/mol", "molecular weight", 2, 0.05),
    "logp": ("Crippen logP", "logP", 2, 1.0),
    "rings": ("", "rings", None, 0),
    "hbd": ("", "hydrogen-bond donors", None, 0),
    "hba": ("", "hydrogen-bond acceptors", None, 0),
}


def chem_forward_task(rng: random.Random, held_out: bool) -> Item:
    smiles, prop = rng.choice(molecule_pool()), rng.choice(list(CHEM_FORWARD))
    long, short, decimals, tol = CHEM_FORWARD[prop]
    value = chem_property(mol_from_smiles(smiles), prop)
    if decimals is None:
        text, meta = str(int(value)), {"kind": "exact_int", "value": int(value)}
        return Item(smiles, "chem_count", {"s": smiles, "noun": short, "x": smiles, "prop": prop}, text, meta)
    text, meta = numeric_answer(value, decimals, tol * value if prop == "mw" else tol)
    return Item(smiles, "chem_value", {"s": smiles, "long": long, "short": short, "x": smiles, "prop": prop,
                                       "decimals": decimals, "unit": "g/mol" if prop == "mw" else ""}, text, meta)


def chem_inverse_task(rng: random.Random, held_out: bool) -> Item:
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
    key = phrasings.templates("chem_inverse")[0].format(what=what)
    slots = {"what": what, "prop": prop, "lo": f"{lo:g}", "hi": f"{hi:g}", "exact": prop in ("rings", "hbd"),
             "unit": "g/mol" if prop == "mw" else ""}
    return Item(key, "chem_inverse", slots, smiles, {"kind": "chem_inverse", "property": prop, "lo": lo, "hi": hi})


def _check_chem_inverse(meta: dict[str, Any], answer: str) -> float:
    mol = mol_from_smiles(_first_token(answer))
    if mol is None or mol.GetNumAtoms() == 0:
        return 0.0
    return 1.0 if meta["lo"] <= chem_property(mol, meta["property"]) <= meta["hi"] else 0.5


# -------------------------------------------------------------------------------------- mathematics
def math_task(rng: random.Random, held_out: bool) -> Item:
    kind = rng.choice(["add", "sub", "mul", "expr", "mod", "frac", "linear"])
    if kind in ("add", "sub", "mul", "expr"):
        if kind == "mul":
            a, b = rng.randint(2, 99), rng.randint(2, 30)
            e, value = f"{a} * {b}", a * b
        elif kind == "expr":
            a, b, c, d = (rng.randint(1, 20) for _ in range(4))
            e, value = f"({a} + {b}) * {c} - {d}", (a + b) * c - d
        else:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            e, value = (f"{a} + {b}", a + b) if kind == "add" else (f"{a} - {b}", a - b)
        key = f"Compute {e}." if kind == "expr" else f"What is {e}?"  # the original wording: the item's key
        return Item(key, "arith", {"e": e}, str(value), {"kind": "exact_number", "value": str(value)})
    if kind == "mod":
        a, b = rng.randint(20, 500), rng.randint(3, 15)
        return _math_item("mod", {"a": a, "b": b}, str(a % b), str(a % b))
    if kind == "frac":
        den = rng.randint(2, 12)
        num, k = rng.randint(1, 3 * den), rng.randint(2, 9)
        frac = Fraction(num, den)
        text = str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"
        return _math_item("frac", {"f": f"{num * k}/{den * k}"}, text, str(frac))
    x, a, b = rng.randint(-12, 12), rng.randint(2, 9), rng.randint(-30, 30)
    eq = f"{a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}"
    return _math_item("linear", {"eq": eq, "a": a, "pm": "+" if b >= 0 else "-", "babs": abs(b), "c": a * x + b},
                      f"x = {x}", str(x))


def _math_item(kind: str, slots: dict[str, Any], completion: str, value: str) -> Item:
    return Item(phrasings.templates(kind)[0].format(**slots), kind, slots, completion,
                {"kind": "exact_number", "value": value})


# ------------------------------------------------------------------------------------------ general
def general_task(rng: random.Random, held_out: bool) -> Item:
    kind = rng.choice(["capital", "antonym", "upper", "sort", "count", "next", "date", "words"])
    exact = "exact_text"
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        slots, answer = {"c": country}, CAPITALS[country]
    elif kind == "antonym":
        word = rng.choice(sorted(ANTONYMS))
        slots, answer = {"w": word}, ANTONYMS[word]
    elif kind == "upper":
        word = rng.choice(WORDS)
        slots, answer, exact = {"w": word}, word.upper(), "exact_case"
    elif kind == "sort":
        words = rng.sample(WORDS, rng.randint(3, 5))
        slots, answer = {"ws": ", ".join(words)}, ", ".join(sorted(words))
    elif kind == "count":
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        slots, answer = {"t": " ".join(words)}, str(len(words))
    elif kind == "next":
        seq = rng.choice([DAYS, MONTHS])
        i = rng.randrange(len(seq))
        slots, answer = {"u": "day" if seq is DAYS else "month", "x": seq[i]}, seq[(i + 1) % len(seq)]
    elif kind == "date":
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        slots, answer = {"d": f"{y}-{m:02d}-{d:02d}"}, f"{d:02d}/{m:02d}/{y}"
    else:
        n = rng.randint(1, 999)
        slots, answer = {"n": n}, number_words(n)
    key = phrasings.templates(kind)[0].format(**slots)
    return Item(key, kind, slots, answer, {"kind": exact, "value": answer})


# -------------------------------------------------------------------------------------------- graph
def graph_task(rng: random.Random, held_out: bool) -> Item:
    text, triples = passage(rng, held_out)
    return Item(text, "graph", {"p": text}, format_triples(triples), {"kind": "triples", "value": triples})


TASKS: dict[str, list[tuple[str, Task, float]]] = {  # domain -> (task name, generator, weight)
    "protein": [("protein_forward", protein_forward_task, 0.7), ("protein_inverse", protein_inverse_task, 0.3)],
    "chemistry": [("chem_forward", chem_forward_task, 0.7), ("chem_inverse", chem_inverse_task, 0.3)],
    "mathematics": [("math", math_task, 1.0)],
    "general": [("general", general_task, 1.0)],
    "graph": [("graph", graph_task, 1.0)],
}


def item_split_of(domain: str, key: str, held_out: bool, split_by: Callable[[str, str], str] = split_of) -> str:
    """Graph passages are held out by their entities (test) or split train/validation by hash; the rest by
    ``split_by`` (the suite passes its key-space hash)."""
    if domain == "graph" and held_out:
        return "test"
    split = split_by(domain, key)
    return "train" if domain == "graph" and split == "test" else split


def generate(domain: str, split: str, n: int, seed: int = 0) -> list[Record]:
    """``n`` distinct records of ``domain`` in ``split``; a pure function of the arguments.

    ``test_unseen`` draws from the ``test`` items (never trained on) and asks them with the unseen
    phrasings of :mod:`xlora.demo.phrasings`; its draw is its own, so its records are not ``test``'s
    records reworded. Every other split uses the seen phrasings. Each record carries its
    ``template`` id.

    Raises:
        ValueError: unknown domain or split, or fewer than ``n`` distinct records exist in the split.
    """
    phrasings.check_request(domain, split, n, TASKS)
    rng = random.Random(f"xlora-domains:{seed}:{domain}:{split}")
    names, funcs, weights = zip(*TASKS[domain])
    item_split = "test" if split == "test_unseen" else split
    held_out, records, seen = item_split == "test", [], set()
    for attempts in itertools.count(1):
        if len(records) == n:
            break
        if attempts > 100 * n + 10_000:
            raise ValueError(f"only {len(records)} distinct {domain!r} records exist in split {split!r} "
                             f"(asked for n={n}); ask for fewer")
        i = rng.choices(range(len(names)), weights)[0]
        item = funcs[i](rng, held_out)
        if item_split_of(domain, item.key, held_out) != item_split:
            continue
        prompt, template = phrasings.phrase(item.kind, split, rng, **item.slots)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"id": f"{domain}-{split}-{seed}-{len(records)}", "domain": domain, "task": names[i],
                        "split": split, "item": item.key, "template": template, "prompt": prompt,
                        "completion": item.completion, "meta": item.meta})
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
    """The number the answer starts with (after an optional one-letter variable, any case: ``x =``, ``K=``),
    or ``None``: garbage that merely contains a digit somewhere earns nothing."""
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
    if kind == "triples":
        return prf(parse_triples(answer).triples, [tuple(t) for t in meta["value"]])[2]
    raise ValueError(f"record {record.get('id')!r} has meta kind {kind!r}, which no checker handles")

