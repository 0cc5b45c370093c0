"""The suite's evaluation checker: suite records by the suite's graded checks, other records by their own check."""

from __future__ import annotations

import pytest
from science_rows import rows_fixture  # noqa: F401 (the shared fixture `rows`)

from xlora.demo import suite
from xlora.demo.suite_eval import evaluate_split, suite_checker

pytest.importorskip("rdkit")
pytest.importorskip("Bio")


def test_suite_records_use_the_graded_suite_check(rows):
    rec = next(r for r in suite.generate("quantum", "test", 40, data_dir=rows) if r["kind"] == "qm_forward")
    value, tol = rec["meta"]["value"], rec["meta"]["tol"]
    assert suite_checker(rec, rec["completion"]) == 1.0
    # graded: off by half the tolerance scores 0.5 (exact match with abs_tol would say 0 or 1)
    assert suite_checker(rec, f"{value + tol / 2:.6f}") == pytest.approx(0.5, abs=1e-3)
    assert suite_checker(rec, "no idea") == 0.0


def test_other_records_use_their_own_check():
    rec = {"prompt": "2+2?", "completion": "4.0", "check": {"abs_tol": 0.1}}
    assert suite_checker(rec, "4.05") == 1.0 and suite_checker(rec, "4.2") == 0.0
    assert suite_checker({"prompt": "x", "completion": "Oslo"}, "Oslo") == 1.0


def test_bad_split_and_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate_split(tmp_path, tmp_path, "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="test_unseen.jsonl does not exist"):
        evaluate_split(tmp_path, tmp_path, "test_unseen", tmp_path)
