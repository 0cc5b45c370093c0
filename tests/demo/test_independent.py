"""The independent held-out set: its records rebuild bit-exactly from the hand-written prompts, and the suite's
checker gives each reference answer full marks (and a wrong answer less)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip("rdkit")  # the labels: RDKit descriptors and Biopython's ProtParam (the demo extra)
pytest.importorskip("Bio")

from xlora.demo.independent import PROMPTS, build_records
from xlora.demo.suite_eval import INDEPENDENT, suite_checker


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return build_records(PROMPTS)


def test_records_rebuild_bit_exactly_from_the_prompts(records):
    text = "".join(json.dumps(r) + "\n" for r in records)
    assert text == INDEPENDENT.read_text()
    assert Counter(r["domain"] for r in records) == {d: 8 for d in ("protein", "chemistry", "quantum", "mathematics",
                                                                     "general", "graph", "mechanics")}
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    assert [r["messages"][1]["content"] for r in records] == prompts
    assert len(set(prompts)) == 56


def test_every_reference_answer_passes_the_suite_checker_and_a_wrong_one_does_not(records):
    pytest.importorskip("tblite")  # the one qm_inverse record is checked by recomputing GFN2-xTB
    scores = {r["id"]: suite_checker(r, r["messages"][2]["content"]) for r in records}
    assert all(s == 1.0 for s in scores.values()), {k: s for k, s in scores.items() if s != 1.0}
    numeric = [r for r in records if r["meta"]["kind"] == "numeric"]
    assert len(numeric) >= 20
    for r in numeric:  # the reference moved by twice the scoring tolerance scores 0
        wrong = r["meta"]["value"] + 2 * r["meta"]["tol"] + 1
        assert suite_checker(r, f"{wrong:.{r['meta']['decimals']}f}") == 0.0, r["id"]
    capital = next(r for r in records if r["meta"]["kind"] == "exact_text")
    assert suite_checker(capital, "Atlantis") == 0.0
