"""The demo's task generators are deterministic and split-disjoint; the checkers accept known-good
answers (recomputed here with Biopython / RDKit) and reject bad ones."""

from __future__ import annotations

import random

import pytest

from xlora.demo import domains
from xlora.demo._domain_data import number_words


def _rec(task: str, meta: dict, completion: str = "") -> dict:
    return {"id": "t", "domain": "x", "task": task, "prompt": "", "completion": completion, "meta": meta}


# ---------------------------------------------------------------------------------- every domain
@pytest.fixture(params=domains.DOMAINS)
def domain(request):
    if request.param == "protein":
        pytest.importorskip("Bio")
    if request.param == "chemistry":
        pytest.importorskip("rdkit")
    return request.param


def test_same_seed_same_records_other_seed_other_records(domain):
    a = domains.generate(domain, "validation", 40, seed=3)
    assert a == domains.generate(domain, "validation", 40, seed=3)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in domains.generate(domain, "validation", 40, seed=4)]
    assert len({r["prompt"] for r in a}) == 40 and {r["split"] for r in a} == {"validation"}


def test_splits_are_disjoint(domain):
    sizes = {"train": 150, "validation": 40, "test": 40}
    prompts = {s: {r["prompt"] for r in domains.generate(domain, s, n)} for s, n in sizes.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]


def test_the_reference_completion_scores_one(domain):
    records = domains.generate(domain, "test", 60)
    assert all(domains.check(r, r["completion"]) == 1.0 for r in records)
    assert {r["task"] for r in records} == {name for name, _, _ in domains.TASKS[domain]}


def test_items_carry_the_slots_the_composer_needs():
    pytest.importorskip("rdkit")
    pytest.importorskip("Bio")
    rng = random.Random(0)
    item = domains.protein_forward_task(rng, False)
    assert item.slots["x"] == item.key and item.slots["prop"] in domains.PROTEIN_PROPS
    assert item.slots["unit"] == ("Da" if item.slots["prop"] == "mw" else "")
    for _ in range(40):
        item = domains.math_task(rng, False)
        if item.kind == "linear":
            s = item.slots
            assert item.key == f"Solve for x: {s['a']}x {s['pm']} {s['babs']} = {s['c']}."
            x = int(item.completion.removeprefix("x = "))
            assert s["a"] * x + (s["babs"] if s["pm"] == "+" else -s["babs"]) == s["c"]
        item = domains.chem_inverse_task(rng, False)
        assert item.slots["exact"] == (item.meta["property"] in ("rings", "hbd"))
        assert item.slots["lo"] == f"{item.meta['lo']:g}"


def test_mixture_interleaves_domains():
    mix = domains.generate_mixture("test", 3, domains=["mathematics", "general"])
    assert [r["domain"] for r in mix] == ["mathematics", "general"] * 3
    assert mix[0] == domains.generate("mathematics", "test", 3)[0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="domain 'poetry'"):
        domains.generate("poetry", "test", 1)
    with pytest.raises(ValueError, match="split 'dev'"):
        domains.generate("general", "dev", 1)


# ---------------------------------------------------------------------------------- mathematics
def test_arithmetic_checker():
    add = next(r for r in domains.generate("mathematics", "train", 400)
               if r["template"] == "arith/s0" and " + " in r["prompt"] and "(" not in r["prompt"])
    a, b = map(int, add["prompt"].removeprefix("What is ").rstrip("?").split(" + "))
    assert domains.check(add, str(a + b)) == 1.0
    assert domains.check(add, f" {a + b}.") == 1.0
    assert domains.check(add, str(a + b + 1)) == 0.0
    assert domains.check(add, f"abc{a + b}") == 0.0  # a digit somewhere in garbage is not an answer
    eq = _rec("math", {"kind": "exact_number", "value": "-6"})
    assert domains.check(eq, "x = -6") == domains.check(eq, "-6") == 1.0
    assert domains.check(eq, "x = 6") == 0.0
    assert domains.check(eq, "y = -6") == domains.check(eq, "n=-6") == 1.0  # the composed wording renames x
    assert domains.check(eq, "K = -6") == domains.check(eq, "X=-6") == 1.0  # a capital letter is a variable too
    frac = _rec("math", {"kind": "exact_number", "value": "3/4"})
    assert domains.check(frac, "3/4") == domains.check(frac, "6/8") == 1.0
    assert domains.check(frac, "4/3") == 0.0


# ------------------------------------------------------------------------------------- general
def test_general_checker():
    cap = _rec("general", {"kind": "exact_text", "value": "Buenos Aires"})
    assert domains.check(cap, " buenos aires.") == 1.0
    assert domains.check(cap, "Lima") == 0.0
    upper = _rec("general", {"kind": "exact_case", "value": "ZEBRA"})
    assert domains.check(upper, "ZEBRA") == 1.0 and domains.check(upper, "zebra") == 0.0
    assert number_words(347) == "three hundred forty-seven" and number_words(90) == "ninety"


# ------------------------------------------------------------------------------------- protein
def test_protein_forward_checker_against_biopython():
    pytest.importorskip("Bio")
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    recs = [r for r in domains.generate("protein", "test", 80) if r["task"] == "protein_forward"]
    rec = next(r for r in recs if "isoelectric" in r["prompt"])
    seq = rec["item"]  # the sequence, whatever the phrasing
    assert seq in rec["prompt"]
    truth = ProteinAnalysis(seq).isoelectric_point()
    assert domains.check(rec, f"{truth:.2f}") == 1.0
    assert domains.check(rec, f"{truth + 0.5:.2f}") == pytest.approx(0.5, abs=0.01)  # tol 1 pH unit
    assert domains.check(rec, f"{truth + 3:.2f}") == 0.0
    assert domains.check(rec, "no idea") == 0.0
    mw = next(r for r in recs if "molecular weight" in r["prompt"])
    truth = ProteinAnalysis(mw["item"]).molecular_weight()
    assert domains.check(mw, f"{truth:.1f}") == 1.0
    assert domains.check(mw, f"{truth * 1.025:.1f}") == pytest.approx(0.5, abs=0.01)  # tol 5 %


def test_protein_inverse_checker():
    pytest.importorskip("Bio")
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    seq = "MKTAYIAKQRQISFVK"
    g = ProteinAnalysis(seq).gravy()
    meta = {"kind": "protein_inverse", "property": "gravy", "lo": round(g - 0.1, 3), "hi": round(g + 0.1, 3),
            "length": len(seq)}
    rec = _rec("protein_inverse", meta)
    assert domains.check(rec, seq) == 1.0
    assert domains.check(rec, seq.lower() + ".") == 1.0
    assert domains.check(rec, seq[:-1]) == 0.25  # a sequence, but of the wrong length
    assert domains.check(rec, seq[:-1] + "B") == 0.0  # not an amino acid
    assert domains.check(rec, "I" * len(seq)) == 0.5  # valid, GRAVY 4.5 is out of range


# ------------------------------------------------------------------------------------ chemistry
def test_chemistry_forward_checker_against_rdkit():
    pytest.importorskip("rdkit")
    from rdkit import Chem
    from rdkit.Chem import Crippen, Descriptors, rdMolDescriptors

    recs = domains.generate("chemistry", "test", 120)
    logp = next(r for r in recs if r["task"] == "chem_forward" and "logP" in r["prompt"])
    mol = Chem.MolFromSmiles(logp["item"])
    truth = Crippen.MolLogP(mol)
    assert domains.check(logp, f"{truth:.2f}") == 1.0
    assert domains.check(logp, f"{truth + 0.25:.2f}") == pytest.approx(0.75, abs=0.01)
    mw = next(r for r in recs if r["task"] == "chem_forward" and "molecular weight" in r["prompt"])
    mol = Chem.MolFromSmiles(mw["item"])
    assert domains.check(mw, f"{Descriptors.MolWt(mol):.2f}") == 1.0
    rings = next(r for r in recs if r["template"].startswith("chem_count/") and "rings" in r["prompt"])
    mol = Chem.MolFromSmiles(rings["item"])
    n = rdMolDescriptors.CalcNumRings(mol)
    assert domains.check(rings, str(n)) == 1.0 and domains.check(rings, str(n + 1)) == 0.0


def test_chemistry_inverse_checker():
    pytest.importorskip("rdkit")
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    mw = Descriptors.MolWt(Chem.MolFromSmiles("CCO"))  # 46.07
    rec = _rec("chem_inverse", {"kind": "chem_inverse", "property": "mw", "lo": 40.0, "hi": 50.0})
    assert 40 < mw < 50
    assert domains.check(rec, "CCO") == domains.check(rec, "OCC.") == 1.0
    assert domains.check(rec, "c1ccccc1") == 0.5  # valid, 78 g/mol is out of range
    assert domains.check(rec, "C1CC") == 0.0  # unclosed ring: invalid SMILES
    assert domains.check(rec, "") == 0.0
    rings = _rec("chem_inverse", {"kind": "chem_inverse", "property": "rings", "lo": 2, "hi": 2})
    assert domains.check(rings, "c1ccc2ccccc2c1") == 1.0 and domains.check(rings, "c1ccccc1") == 0.5


def test_molecule_pool_is_valid_and_deterministic():
    pytest.importorskip("rdkit")
    pool = domains.molecule_pool()
    assert len(pool) > 500 and pool == sorted(pool)
    assert all(domains.mol_from_smiles(s) is not None for s in pool)
