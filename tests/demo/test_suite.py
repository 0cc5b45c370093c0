"""The science suite: item-disjoint splits over shared key spaces, composed wording with test_unseen unseen,
checks per record, the data rows read and cleaned, the split files written, all a pure function of the seed."""

from __future__ import annotations

import json
import re

import pytest
from science_rows import rows_fixture  # noqa: F401 (the shared fixture `rows`)

from xlora.demo import _wording_data as vocab
from xlora.demo import suite, wording
from xlora.demo.science_tasks import load_pools

pytest.importorskip("rdkit")
pytest.importorskip("Bio")


def test_rows_are_classified_cleaned_and_averaged(rows):
    pools = load_pools(rows)
    assert len(pools.qm) == 400  # the skip line is no molecule
    assert len(pools.measured) == 333  # rows with a hydration free energy or a logS (i % 2 or i % 3)
    assert len(pools.mechanics) == 200 and {r["seeds"] for r in pools.mechanics} == {2}  # torn line dropped
    assert pools.qm == sorted(pools.qm, key=lambda r: r["smiles"])
    row = pools.qm[0]
    assert row["gap"] == pytest.approx(row["lumo"] - row["homo"])
    with open(f"{rows}/peptides.jsonl") as f:
        first = [json.loads(ln) for ln in f.readlines()[:2]]
    mean = next(r for r in pools.mechanics if r["sequence"] == first[0]["sequence"])
    assert mean["force"] == pytest.approx((first[0]["peak_force_pn"] + first[1]["peak_force_pn"]) / 2)


@pytest.mark.parametrize("domain", suite.DOMAINS)
def test_splits_never_share_items_and_test_unseen_draws_held_out_items(domain, rows):
    recs = {s: suite.generate(domain, s, 200 if s == "train" else 40, data_dir=rows) for s in suite.SPLITS}
    items = {s: {r["item"] for r in rs} for s, rs in recs.items()}
    assert not items["train"] & items["validation"] and not items["train"] & items["test"]
    assert not items["validation"] & items["test"]
    assert not items["test_unseen"] & (items["train"] | items["validation"])
    if domain != "graph":  # graph test passages are held out by their entities instead
        assert {suite.split_of(domain, k) for k in items["test_unseen"]} == {"test"}
        assert {suite.split_of(domain, k) for k in items["train"]} == {"train"}
    assert {r["task"] for r in recs["test_unseen"]} == {t for t, _, _ in suite.TASKS[domain]}
    for split, rs in recs.items():
        assert len({r["prompt"] for r in rs}) == len(rs) and {r["split"] for r in rs} == {split}


def test_a_molecule_held_out_in_one_domain_is_held_out_in_all(rows):
    qm_test = {r["item"] for r in suite.generate("quantum", "test", 40, data_dir=rows)}
    chem_train = {r["item"] for r in suite.generate("chemistry", "train", 400, data_dir=rows)}
    assert qm_test and not qm_test & chem_train
    assert {suite.split_of("chemistry", k) for k in qm_test} == {"test"}


@pytest.mark.parametrize("domain", suite.DOMAINS)
def test_test_unseen_has_no_family_or_alias_of_training(domain, rows):
    train = suite.generate(domain, "train", 300, data_dir=rows)
    unseen = suite.generate(domain, "test_unseen", 48, data_dir=rows)
    assert not {r["family"] for r in train} & {r["family"] for r in unseen}
    assert not {r["wording"]["prop"] for r in unseen if "prop" in r["wording"]} & \
        {r["wording"]["prop"] for r in train if "prop" in r["wording"]}
    for kind in {r["kind"] for r in unseen}:
        props = tuple(sorted({r["meta"]["property"] for r in unseen if r["kind"] == kind and "property" in r["meta"]}
                             & set(wording.vocab.PROPERTY_ALIASES)))
        held = wording.held_out_phrases(kind, props)
        for r in train:  # the training prompts' wording (their template) never uses a held-out phrase
            text = r["template"].lower()
            assert not [h for h in held if re.search(r"(?<![\w-])" + re.escape(h) + r"(?![\w-])", text)], r["template"]


@pytest.mark.parametrize("domain", suite.DOMAINS)
def test_reference_answers_score_one_and_carry_their_check(domain, rows):
    for r in suite.generate(domain, "test", 40, data_dir=rows):
        if r["kind"] not in ("qm_inverse", "mech_inverse"):  # those simulate the answer (tested with sciencedata)
            assert suite.check(r, r["completion"]) == 1.0, r
        assert len(r["check"]) == 1 and next(iter(r["check"])) in ("exact", "rel_tol", "abs_tol")
        if r["kind"] in ("protein_forward", "chem_value", "qm_forward", "measured", "mech_forward"):
            assert r["prompt"] == r["template"].format(x=r["item"], decimals=r["meta"]["decimals"])


def test_checks_and_values_of_physics_records(rows):
    recs = suite.generate("quantum", "test", 40, data_dir=rows) + suite.generate("mechanics", "test", 40, data_dir=rows)
    pools = load_pools(rows)
    by_smiles = {r["smiles"]: r for r in pools.qm}
    by_seq = {r["sequence"]: r for r in pools.mechanics}
    n = 0
    for r in recs:
        if r["kind"] == "qm_forward":
            prop = r["meta"]["property"]
            assert float(r["completion"]) == pytest.approx(by_smiles[r["item"]][prop], abs=0.005)
            assert r["check"] == ({"abs_tol": 0.5} if prop == "dipole" else {"abs_tol": 0.3})
            n += 1
        elif r["kind"] == "mech_forward":
            prop = r["meta"]["property"]
            assert float(r["completion"]) == pytest.approx(by_seq[r["item"]][prop], abs=0.5 if prop == "force" else 0.05)
            assert r["check"] == ({"rel_tol": 0.15} if prop == "force" else {"rel_tol": 0.2})
            n += 1
        elif r["kind"] == "qm_inverse":
            assert r["meta"]["lo"] <= by_smiles[r["completion"]]["gap"] <= r["meta"]["hi"]
            assert r["meta"]["hi"] - r["meta"]["lo"] == pytest.approx(1.0)
        elif r["kind"] == "mech_inverse":
            assert len(r["completion"]) == r["meta"]["length"] and str(r["meta"]["length"]) in r["prompt"]
            assert r["meta"]["lo"] <= by_seq[r["completion"]]["force"] <= r["meta"]["hi"]
    assert n >= 40


def test_a_linear_answer_names_the_prompts_variable(rows):
    recs = [r for r in suite.generate("mathematics", "train", 300, data_dir=rows) if r["kind"] == "linear"]
    assert len({r["wording"]["v"] for r in recs}) == 4
    for r in recs:
        v = r["wording"]["v"]
        assert r["completion"].startswith(f"{v} = ") and re.search(rf"\d\*?{v} [+-] \d", r["prompt"])
        assert suite.check(r, r["completion"]) == 1.0


def test_generation_is_a_pure_function_of_the_seed(rows):
    a = suite.generate("quantum", "validation", 30, seed=3, data_dir=rows)
    assert a == suite.generate("quantum", "validation", 30, seed=3, data_dir=rows)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in suite.generate("quantum", "validation", 30, seed=4,
                                                                              data_dir=rows)]


def test_bad_arguments_and_missing_data_are_named(rows, tmp_path):
    with pytest.raises(ValueError, match="domain 'poetry'"):
        suite.generate("poetry", "test", 1, data_dir=rows)
    with pytest.raises(ValueError, match="split 'dev'"):
        suite.generate("quantum", "dev", 1, data_dir=rows)
    with pytest.raises(ValueError, match="task kind 'qm_forward' has no data rows"):
        suite.generate("quantum", "test", 1, data_dir=str(tmp_path))


def test_split_files_have_the_trainer_shapes_and_counts(rows, tmp_path):
    sizes = {"train": 24, "validation": 6, "test": 6, "test_unseen": 6}
    manifest = suite.write_splits(tmp_path, sizes, data_dir=rows)
    files = manifest["files"]
    assert files["train/quantum.jsonl"]["records"] == 24 and files["test_unseen.jsonl"]["records"] == 6 * 7
    assert files["composite.jsonl"]["records"] == 3 * 16 and files["composite_train.jsonl"]["records"] == 3 * 64
    assert files["head_train.jsonl"]["records"] == 7 * suite.HEAD_PER_DOMAIN + 3 * 64
    assert manifest["missing"] == {} and manifest["science_rows"] == {"qm": 400, "measured": 333,
                                                                      "mechanics_sequences": 200}
    line = json.loads((tmp_path / "test_unseen" / "quantum.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
    assert line["domain"] == "quantum" and line["family"].split("/")[1] in ("inverted", "task_card", "wish")
    assert set(line) >= {"messages", "domain", "check", "meta", "kind"}
    first = json.loads((tmp_path / "test_unseen.jsonl").read_text().splitlines()[0])
    assert first["domain"] == "protein"  # interleaved in the domain order
    again = suite.write_splits(tmp_path / "again", sizes, data_dir=rows)
    assert {k: v["sha256"] for k, v in again["files"].items()} == {k: v["sha256"] for k, v in files.items()}
    # the head's composite records take no routing label; composite_train.jsonl keeps them
    head = [json.loads(x) for x in (tmp_path / "head_train.jsonl").read_text().splitlines()]
    comp = [json.loads(x) for x in (tmp_path / "composite_train.jsonl").read_text().splitlines()]
    assert all(len(r["experts"]) == 2 for r in comp) and head[-len(comp):] == [
        {k: v for k, v in r.items() if k != "experts"} for r in comp]
    assert manifest["head_casings"] == list(wording.CASINGS) and manifest["head_wide"] is True
    wide_families = {f"forward/{f}" for f in vocab.WIDE_FRAMES["forward"]}  # the head's draw is the wide one ...
    assert {r.get("family") for r in head} & wide_families
    for split in ("train", "validation", "test"):  # ... and no expert's split or test sees it
        recs = [json.loads(x) for x in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert not {r.get("family") for r in recs} & wide_families


def test_the_heads_draw_takes_every_casing_and_the_experts_splits_no_all_caps(rows):
    for domain in ("mathematics", "chemistry"):
        head = suite.generate(domain, "train", 60, seed=1, data_dir=rows, casings=suite.HEAD_CASINGS)
        assert {r["wording"]["casing"] for r in head} == set(wording.CASINGS)
        for split in ("train", "validation", "test"):
            assert "upper" not in {r["wording"]["casing"] for r in suite.generate(domain, split, 30, data_dir=rows)}
