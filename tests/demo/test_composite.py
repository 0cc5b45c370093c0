"""Composite tasks: two experts' knowledge in one prompt, drawn from held-out items (``composite``) or from
training items for the head only (``composite_train``); answers recomputed from the rows."""

from __future__ import annotations

import re

import pytest
from science_rows import rows_fixture, write_rows  # noqa: F401 (the shared fixture `rows`)

from xlora.demo import composite, suite
from xlora.demo.science_tasks import load_pools

pytest.importorskip("rdkit")
pytest.importorskip("Bio")


def _keys(record):
    return record["meta"]["items"]


def test_composite_items_are_held_out_and_composite_train_items_are_training_items(rows):
    held = composite.generate("composite", 16, data_dir=rows)
    train = composite.generate("composite_train", 64, data_dir=rows)
    assert [r["kind"] for r in held[:3]] == list(composite.KINDS) and len(held) == 48 and len(train) == 192
    space = {"qm_arith": "quantum", "peptide_compare": "mechanics", "measured_triples": "chemistry"}
    for r in held:
        assert {suite.split_of(space[r["kind"]], k) for k in _keys(r)} == {"test"}, r
    for r in train:
        assert {suite.split_of(space[r["kind"]], k) for k in _keys(r)} == {"train"}, r
    # no expert's training item appears in a composite prompt
    expert_items = {r["item"] for d in ("quantum", "mechanics", "chemistry")
                    for r in suite.generate(d, "train", 300, data_dir=rows)}
    assert not {k for r in held for k in _keys(r)} & expert_items
    assert {tuple(r["experts"]) for r in held} == set(composite.KINDS.values())
    assert {r["domain"] for r in held + train} == {"composite"}


def test_answers_are_recomputed_from_the_rows(rows):
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    pools = load_pools(rows)
    qm = {r["smiles"]: r for r in pools.qm}
    mech = {r["sequence"]: r for r in pools.mechanics}
    measured = {r["smiles"]: r for r in pools.measured}
    for r in composite.generate("composite", 16, data_dir=rows):
        assert suite.check(r, r["completion"]) == 1.0
        if r["kind"] == "qm_arith":
            row = qm[_keys(r)[0]]
            values = {row[p] for p in ("gap", "homo", "lumo")}
            k = re.search(r"(?:by|^What is) (\d)\b", r["prompt"])
            c = re.search(r"(?:add|minus) (\d\.\d)", r["prompt"])
            candidates = {round(v * int(k.group(1)), 2) for v in values} if k else \
                {round(v + float(c.group(1)), 2) for v in values} | {round(v - float(c.group(1)), 2) for v in values}
            assert float(r["completion"]) in candidates, r
            assert suite.check(r, f"{float(r['completion']) + 5:.2f}") == 0.0
        elif r["kind"] == "peptide_compare":
            a, b = _keys(r)
            pa, pb = ProteinAnalysis(a).isoelectric_point(), ProteinAnalysis(b).isoelectric_point()
            want = f"force {1 if mech[a]['force'] > mech[b]['force'] else 2}, pI {1 if pa > pb else 2}"
            assert r["completion"] == want and a in r["prompt"] and b in r["prompt"]
            assert suite.check(r, "force 3, pI 3") == 0.0
        else:
            lines = r["completion"].splitlines()
            assert len(lines) == len(_keys(r)) in (2, 3)
            for line, smiles in zip(lines, _keys(r)):
                subject, relation, obj = line.split(" | ")
                prop = "hydration" if relation == "hydration free energy" else "logs"
                assert subject == smiles and obj.split()[0] == f"{measured[smiles][prop]:.2f}"
            assert suite.check(r, lines[0]) == pytest.approx(2 / (1 + len(lines)))  # F1 of one right triple


def test_composite_is_a_pure_function_of_the_seed_and_refuses_bad_arguments(rows):
    a = composite.generate("composite", 4, seed=1, data_dir=rows)
    assert a == composite.generate("composite", 4, seed=1, data_dir=rows)
    assert a != composite.generate("composite", 4, seed=2, data_dir=rows)
    with pytest.raises(ValueError, match="composite split 'test'"):
        composite.generate("test", 1, data_dir=rows)
    with pytest.raises(ValueError, match="n_per_kind must be >= 0"):
        composite.generate("composite", -1, data_dir=rows)


def test_too_few_items_are_named(tmp_path):
    few = write_rows(tmp_path / "few", n_molecules=300, n_peptides=3)
    with pytest.raises(ValueError, match=r"composite split 'composite' needs more held-out items: \{'mechanics': [01]\}"):
        composite.generate("composite", 1, data_dir=str(few))
