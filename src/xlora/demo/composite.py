"""Composite tasks: prompts that need two experts at once (the LoRA-Flow / LoRA Soups protocol).

Kinds (the experts they need in brackets):

- ``qm_arith`` [quantum, mathematics]: an xTB property of a molecule, then an arithmetic step on it
  ("3 times the HOMO-LUMO gap of CCO");
- ``peptide_compare`` [mechanics, protein]: two peptides compared on their steered-MD peak force and on
  their isoelectric point ("force 2, pI 1");
- ``measured_triples`` [graph, chemistry]: a passage about molecules' measured hydration free energies and
  solubilities -> its ``subject | relation | object`` triples.

Two splits: ``composite`` draws its molecules and peptides from the held-out (``test``) item pool of
:mod:`xlora.demo.suite`, so no expert and no head has seen them; it is evaluation only. ``composite_train``
draws from the training pool and is **trained on by the head, never by an expert**: the head learns to
mix two experts from a few hundred such records (as LoRA-Flow trains its gates on few-shot data), while
every expert stays a single-domain expert. Records have the suite's shape with ``domain="composite"``
and ``experts``: the two domains the task needs.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from xlora.demo import science_tasks
from xlora.demo._wording_data import PROPERTY_ALIASES
from xlora.demo.science import protein_property
from xlora.demo.triples import format_triples

SPLITS = ("composite", "composite_train")
KINDS = {"qm_arith": ("quantum", "mathematics"), "peptide_compare": ("mechanics", "protein"),
         "measured_triples": ("graph", "chemistry")}
_POOL_SPLIT = {"composite": "test", "composite_train": "train"}

Record = dict[str, Any]

_ARITH_FRAMES = ("What is {k} times the {prop} of {x}, in eV? Give 2 decimals.",
                 "Compute the {prop} of the molecule {x} in eV, then multiply it by {k}. Round to 2 decimals.",
                 "Take the {prop} of {x} (eV) and add {c}. Answer with 2 decimals.",
                 "The {prop} of {x}, in eV, minus {c}: what do you get? 2 decimals.")
_COMPARE_FRAMES = ("Peptide 1: {a}. Peptide 2: {b}. Which has the higher {force} when pulled apart, and which has "
                   "the higher {pi}? Answer as: force <1 or 2>, pI <1 or 2>.",
                   "Compare {a} (1) with {b} (2): which needs the larger {force} to stretch, and which has the larger "
                   "{pi}? Reply in the form force N, pI N.")
_PASSAGE = {"hydration": ("{s} has a measured {alias} of {v} kcal/mol.", "hydration free energy", "{v} kcal/mol"),
            "logs": ("The measured {alias} of {s} is {v} log(mol/L).", "logS", "{v} log(mol/L)")}  # a field needs a letter
_TRIPLES_FRAMES = ("Extract the knowledge-graph triples from this passage, one per line as subject | relation | "
                   "object.\n\n{p}",
                   "Text: {p}\n\nWrite its triples, one per line: subject | relation | object.")


def _held(pools_rows: list[dict[str, Any]], domain: str, key: str, split: str) -> list[dict[str, Any]]:
    return [r for r in pools_rows if science_tasks.split_of(domain, r[key]) == _POOL_SPLIT[split]]


def _qm_arith(rng: random.Random, rows: dict[str, list]) -> tuple[str, str, dict[str, Any]]:
    row = rng.choice(rows["qm"])  # load_pools keeps only molecules with every QM value finite
    prop = rng.choice(["gap", "homo", "lumo"])
    frame = rng.randrange(len(_ARITH_FRAMES))
    k, c = rng.randint(2, 5), round(rng.uniform(0.5, 5.0), 1)
    value = float(row[prop]) * k if frame < 2 else float(row[prop]) + (c if frame == 2 else -c)
    prompt = _ARITH_FRAMES[frame].format(k=k, c=c, x=row["smiles"], prop=rng.choice(PROPERTY_ALIASES[prop][0]))
    text = f"{value:.2f}"
    tol = 0.3 * (k if frame < 2 else 1)
    return prompt, text, {"kind": "numeric", "value": float(text), "decimals": 2, "tol": 2 * tol,
                          "check": {"abs_tol": tol}, "items": [row["smiles"]]}


def _peptide_compare(rng: random.Random, rows: dict[str, list]) -> tuple[str, str, dict[str, Any]]:
    for _ in range(100):  # two peptides whose forces and pIs both differ
        a, b = rng.sample(rows["mechanics"], 2)
        pa, pb = protein_property(a["sequence"], "pi"), protein_property(b["sequence"], "pi")
        if a["force"] != b["force"] and round(pa, 2) != round(pb, 2):
            break
    prompt = rng.choice(_COMPARE_FRAMES).format(a=a["sequence"], b=b["sequence"],
                                                force=rng.choice(PROPERTY_ALIASES["force"][0]),
                                                pi=rng.choice(PROPERTY_ALIASES["pi"][0]))
    text = f"force {1 if a['force'] > b['force'] else 2}, pI {1 if pa > pb else 2}"
    return prompt, text, {"kind": "exact_text", "value": text, "check": {"exact": True},
                          "items": [a["sequence"], b["sequence"]]}


def _measured_triples(rng: random.Random, rows: dict[str, list]) -> tuple[str, str, dict[str, Any]]:
    sentences, triples, items = [], [], []
    for row in rng.sample(rows["measured"], rng.randint(2, 3)):
        prop = rng.choice([p for p in _PASSAGE if row.get(p) is not None])
        sentence, relation, obj = _PASSAGE[prop]
        v = f"{float(row[prop]):.2f}"
        sentences.append(sentence.format(s=row["smiles"], v=v, alias=rng.choice(PROPERTY_ALIASES[prop][0])))
        triples.append((row["smiles"], relation, obj.format(v=v)))
        items.append(row["smiles"])
    prompt = rng.choice(_TRIPLES_FRAMES).format(p=" ".join(sentences))
    return prompt, format_triples(triples), {"kind": "triples", "value": [list(t) for t in triples],
                                             "check": {"exact": True}, "items": items}


_MAKERS = {"qm_arith": _qm_arith, "peptide_compare": _peptide_compare, "measured_triples": _measured_triples}


def generate(split: str, n_per_kind: int, seed: int = 0, data_dir: str | None = None) -> list[Record]:
    """``n_per_kind`` records of every composite kind, interleaved (kind order fixed), distinct prompts.

    Raises:
        ValueError: an unknown split, ``n_per_kind < 0``, or too few items in the pool.
    """
    if split not in SPLITS:
        raise ValueError(f"composite split {split!r} is unknown; choose one of {list(SPLITS)}")
    if n_per_kind < 0:
        raise ValueError(f"n_per_kind must be >= 0, got {n_per_kind}")
    pools = science_tasks.load_pools(data_dir)
    rows = {"qm": _held(pools.rows("qm_forward"), "quantum", "smiles", split),
            "measured": _held(pools.rows("measured"), "chemistry", "smiles", split),
            "mechanics": _held(pools.rows("mech_forward"), "mechanics", "sequence", split)}
    least = {"qm": 1, "measured": 3, "mechanics": 2}  # items one record needs
    short = {k: len(v) for k, v in rows.items() if len(v) < least[k]}
    if short:
        raise ValueError(f"composite split {split!r} needs more held-{'out' if split == 'composite' else 'in'} items: "
                         f"{short} (at least {least}); generate more science data")
    per_kind = []
    for kind, needs in KINDS.items():
        rng, out, seen = random.Random(f"xlora-composite:{seed}:{kind}:{split}"), [], set()
        for attempts in itertools.count(1):
            if len(out) == n_per_kind:
                break
            if attempts > 100 * n_per_kind + 1000:
                raise ValueError(f"only {len(out)} distinct {kind!r} records in {split!r} (asked for "
                                 f"n_per_kind={n_per_kind}); ask for fewer or generate more science data")
            prompt, completion, meta = _MAKERS[kind](rng, rows)
            if prompt not in seen:
                seen.add(prompt)
                out.append({"id": f"composite-{split}-{seed}-{kind}-{len(out)}", "domain": "composite",
                            "experts": list(needs), "task": kind, "kind": kind, "split": split,
                            "item": " + ".join(meta["items"]), "prompt": prompt, "completion": completion,
                            "check": meta.pop("check"), "meta": meta})
        per_kind.append(out)
    return [recs[i] for i in range(n_per_kind) for recs in per_kind]
