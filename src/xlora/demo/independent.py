"""An independent held-out evaluation set: hand-written prompts turned into suite records.

``assets/suite/independent/prompts.jsonl`` holds only what a person wrote (one line per record: ``domain``,
``task``, ``item``, ``property``, ``prompt``, ``style``, and ``lo``/``hi``/``length``, ``triples``, ``capital``
or ``kind`` where the task needs them). :func:`build_records` computes every label with the suite's own
code (Biopython ProtParam, RDKit, the science rows' GFN2-xTB / measured / steered-MD values, the suite's
answer formats) and returns records in the suite's training shape, so ``xlora eval`` and
:func:`xlora.demo.suite_eval.suite_checker` score them like the suite's own splits (provenance: ``README.md``).
"""

from __future__ import annotations

import ast
import json
import operator
import random
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from xlora.demo import domains, science_tasks, suite
from xlora.demo._domain_data import CAPITALS
from xlora.demo.ontology import ENTITIES, RELATIONS
from xlora.demo.phrasings import Item
from xlora.demo.science import chem_property, mol_from_smiles, protein_property
from xlora.demo.triples import format_triples

PROMPTS = Path(__file__).parent / "assets" / "suite" / "independent" / "prompts.jsonl"
SPLIT = "independent"
Record = dict[str, Any]
_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: str, env: dict[str, Fraction] | None = None) -> Fraction:
    """An integer expression (``+ - * /``, parentheses, one-letter variables) evaluated exactly."""
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.Name):
            return (env or {})[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


def _math(p: Record) -> tuple[Item, dict[str, str]]:
    """Arithmetic (``arith``) or a linear equation in one lower-case letter (``linear``, written with ``*``)."""
    if p["kind"] == "arith":
        value = str(_evaluate(p["item"]))
        return Item(p["item"], "arith", {"e": p["item"]}, value, {"kind": "exact_number", "value": value}), {}
    lhs, rhs = p["item"].split("=")
    names = {n.id for n in ast.walk(ast.parse(f"({lhs}) - ({rhs})", mode="eval")) if isinstance(n, ast.Name)}
    if len(names) != 1 or not (v := names.pop()).islower():  # the checker reads "k = -5", not "K = -5"
        raise ValueError(f"{p['item']!r}: one lower-case variable expected")
    f = [_evaluate(f"({lhs}) - ({rhs})", {v: Fraction(x)}) for x in (0, 1, 2)]
    if f[1] == f[0] or f[2] - f[1] != f[1] - f[0]:
        raise ValueError(f"{p['item']!r} is not linear with one solution")
    x = str(-f[0] / (f[1] - f[0]))  # "x = ..." renamed to the prompt's letter by suite.make_record
    return Item(p["item"], "linear", {"eq": p["item"]}, f"x = {x}", {"kind": "exact_number", "value": x}), {"v": v}


def _protein(p: Record) -> Item:
    """ProtParam forward (the suite's decimals and tolerances) or an inverse range with a verified answer."""
    seq, prop = p["item"], p["property"]
    if p["task"] == "protein_forward":
        _, _, decimals, tol = domains.PROTEIN_PROPS[prop]
        value = protein_property(seq, prop)
        text, meta = domains.numeric_answer(value, decimals, tol * value if prop == "mw" else tol)
        return Item(seq, "protein_forward", {"x": seq, "prop": prop}, text, meta)
    value = protein_property(seq, prop)
    if len(seq) != p["length"] or not p["lo"] <= value <= p["hi"]:
        raise ValueError(f"{seq}: {prop} {value:.3f} / length {len(seq)} misses the asked range")
    meta = {"kind": "protein_inverse", "property": prop, "lo": p["lo"], "hi": p["hi"], "length": p["length"]}
    return Item(seq, "protein_inverse", {"prop": prop}, seq, meta)


def _nearest_molecule(value_of: Callable[[dict[str, Any], Any], float], lo: float, hi: float) -> str:
    """A neutral held-out (``test``) molecule of the science rows with ``value_of`` nearest the centre of the range."""
    from rdkit import Chem

    best: tuple[float, str] | None = None
    for row in science_tasks.load_pools().qm:
        if science_tasks.split_of("quantum", row["smiles"]) != "test":
            continue
        mol = mol_from_smiles(row["smiles"])
        if mol is None or Chem.GetFormalCharge(mol) != 0:
            continue
        value = value_of(row, mol)
        if lo <= value <= hi and (best is None or abs(value - (lo + hi) / 2) < best[0]):
            best = (abs(value - (lo + hi) / 2), row["smiles"])
    if best is None:
        raise ValueError(f"no molecule in the rows has a value in [{lo}, {hi}]")
    return best[1]


def _chemistry(p: Record) -> Item:
    """RDKit descriptors (``chem_value`` / ``chem_count``) and a molecule in a descriptor range."""
    prop = p["property"]
    if p["task"] == "chem_inverse":
        smiles = _nearest_molecule(lambda row, mol: chem_property(mol, prop), p["lo"], p["hi"])
        meta = {"kind": "chem_inverse", "property": prop, "lo": p["lo"], "hi": p["hi"]}
        return Item(p["prompt"], "chem_inverse", {"prop": prop}, smiles, meta)
    smiles = p["item"]
    _, _, decimals, tol = domains.CHEM_FORWARD[prop]
    value = chem_property(mol_from_smiles(smiles), prop)
    if decimals is None:
        return Item(smiles, "chem_count", {"x": smiles, "prop": prop}, str(int(value)),
                    {"kind": "exact_int", "value": int(value)})
    text, meta = domains.numeric_answer(value, decimals, tol * value if prop == "mw" else tol)
    return Item(smiles, "chem_value", {"x": smiles, "prop": prop}, text, meta)


def _science(p: Record) -> Item:
    """A science row's value (xTB, measured, or the seed mean of the pulls) through the suite's own formatter."""
    pools = science_tasks.load_pools()
    rows, props, key = {"qm_forward": (pools.qm, science_tasks.QM_PROPS, "smiles"),
                        "measured": (pools.measured, science_tasks.MEASURED_PROPS, "smiles"),
                        "mech_forward": (pools.mechanics, science_tasks.MECH_PROPS, "sequence")}[p["task"]]
    row = next((r for r in rows if r[key] == p["item"]), None)
    if row is None or row.get(p["property"]) is None:
        raise ValueError(f"{p['item']!r} has no {p['property']!r} in the science rows")
    one = {p["property"]: props[p["property"]]}
    return science_tasks.forward_item(random.Random(0), [row], one, p["task"], key)  # one row, one property: no draw


def _qm_inverse(p: Record) -> Item:
    """A held-out molecule whose recorded GFN2-xTB gap lies in ``[lo, hi]`` eV."""
    smiles = _nearest_molecule(lambda row, mol: row["gap"], p["lo"], p["hi"])
    meta = {"kind": "qm_inverse", "property": "gap", "lo": p["lo"], "hi": p["hi"], "unit": "eV",
            "check": {"exact": True}}
    return Item(smiles, "qm_inverse", {"prop": "gap"}, smiles, meta)


def _general(p: Record) -> Item:
    """A capital: the demo's own table where it has the country, else the prompt file's (they must agree)."""
    capital = CAPITALS.get(p["item"], p["capital"])
    if capital != p["capital"]:
        raise ValueError(f"{p['item']}: {p['capital']!r} disagrees with the demo's {capital!r}")
    return Item(p["item"], "capital", {"c": p["item"]}, capital, {"kind": "exact_text", "value": capital})


def _graph(p: Record) -> Item:
    """Hand-written triples, checked against the ontology (relation, entity types) and the passage text."""
    kind = {e: k for k, names in ENTITIES.items() for e in names}
    triples = [tuple(t) for t in p["triples"]]
    for s, r, o in triples:
        subject_kinds, object_kind, _ = RELATIONS[r]
        if kind.get(s) not in subject_kinds or kind.get(o) != object_kind:
            raise ValueError(f"ill-typed triple {(s, r, o)}")
        if s.lower() not in p["item"].lower() or o.lower() not in p["item"].lower():
            raise ValueError(f"{(s, r, o)}: entity not named in the passage")
    return Item(p["item"], "graph", {"p": p["item"]}, format_triples(triples), {"kind": "triples", "value": triples})


def build_records(prompts_path: str | Path = PROMPTS) -> list[Record]:
    """Every line of ``prompts_path`` as a suite record in the training (``messages``) shape, ids numbered per domain."""
    lines = Path(prompts_path).read_text(encoding="utf-8").splitlines()
    records: list[Record] = []
    counts: dict[str, int] = {}
    for p in (json.loads(line) for line in lines if line.strip()):
        parts: dict[str, str] = {}
        if p["task"] == "math":
            item, parts = _math(p)
        elif p["domain"] == "protein":
            item = _protein(p)
        elif p["domain"] == "chemistry" and p["task"] != "measured":
            item = _chemistry(p)
        elif p["task"] == "qm_inverse":
            item = _qm_inverse(p)
        elif p["task"] in ("qm_forward", "measured", "mech_forward"):
            item = _science(p)
        else:
            item = {"general": _general, "graph": _graph}[p["task"]](p)
        i = counts[p["domain"]] = counts.get(p["domain"], -1) + 1
        words = SimpleNamespace(prompt=p["prompt"], template=None, family=f"{SPLIT}/{p['style']}", frame=None, parts=parts)
        record = suite.make_record(p["domain"], SPLIT, p["task"], item, words, f"{p['domain']}-{SPLIT}-{i}")
        records.append(suite.training_record(record))
    return records


def main(argv: list[str] | None = None) -> None:
    """``python -m xlora.demo.independent OUT.jsonl [PROMPTS.jsonl]``: write the records as JSON Lines."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        raise SystemExit(main.__doc__)
    records, out = build_records(args[1] if len(args) > 1 else PROMPTS), Path(args[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} records -> {out}")


if __name__ == "__main__":
    main()
