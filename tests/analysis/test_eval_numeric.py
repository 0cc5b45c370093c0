"""R² and MAE of numeric answers (xlora.analysis.eval_numeric)."""

import pytest

from xlora.analysis.eval_numeric import fit_stats, numeric_fit, numeric_group, numeric_markdown


def rec(value, task="qm_forward", prop="gap", check=None):
    r = {"prompt": "q", "completion": f"{value}", "task": task, "check": check or {"abs_tol": 0.3}}
    if prop:
        r["meta"] = {"property": prop}
    return r


def test_groups_by_task_and_property_and_skips_exact_checks():
    assert numeric_group(rec(1.0)) == "qm_forward/gap"
    assert numeric_group(rec(1.0, prop=None, check={"rel_tol": 0.1})) == "qm_forward"
    assert numeric_group({"completion": "x", "domain": "chem", "check": {"abs_tol": 1}}) == "chem"
    assert numeric_group(rec(1.0, check={"exact": True})) is None
    assert numeric_group({"completion": "1"}) is None  # no check: exact by default


def test_fit_stats_against_hand_computed_values():
    pairs = [(1.0, 1.5), (2.0, 2.0), (3.0, 2.0), (6.0, 5.0)]  # mean of y = 3
    f = fit_stats(pairs, n=5)
    sse = 0.25 + 0 + 1 + 1
    sst = 4 + 1 + 0 + 9
    assert f["r2"] == pytest.approx(1 - sse / sst, abs=1e-12)
    assert f["mae"] == pytest.approx((0.5 + 0 + 1 + 1) / 4, abs=1e-12)
    assert f["mae_mean"] == pytest.approx((2 + 1 + 0 + 3) / 4, abs=1e-12)
    assert (f["n"], f["n_parsed"]) == (5, 4)


def test_answering_the_mean_scores_r2_zero_and_worse_is_negative():
    ys = [1.0, 2.0, 3.0, 6.0]
    assert fit_stats([(y, 3.0) for y in ys], 4)["r2"] == pytest.approx(0.0, abs=1e-12)
    assert fit_stats([(y, -y) for y in ys], 4)["r2"] < -1
    assert fit_stats([(1.0, 1.0), (2.0, 2.0)], 2)["r2"] is None  # fewer than MIN_PARSED
    assert fit_stats([(2.0, 1.0)] * 4, 4)["r2"] is None  # every reference equal


def test_numeric_fit_parses_answers_and_counts_unparsed():
    records = [rec(4.5), rec(5.0), rec(3.0), rec(2.0), rec(1.0, prop="dipole"), rec(7, check={"exact": True})]
    answers = ["The gap is 4.4 eV", "5.1", "about 3", "no idea", "1.2 D", "7"]
    fits = numeric_fit(records, answers)
    assert set(fits) == {"qm_forward/gap", "qm_forward/dipole"}
    gap = fits["qm_forward/gap"]
    assert (gap["n"], gap["n_parsed"]) == (4, 3)
    assert gap["mae"] == pytest.approx((0.1 + 0.1 + 0.0) / 3, abs=1e-12)
    assert fits["qm_forward/dipole"]["r2"] is None
    # a row that did not answer a record (oracle: None) leaves it out of n
    assert numeric_fit(records, [None] * 6) == {}


def test_markdown_table_shows_r2_mae_and_parsed_counts():
    configs = {"xlora": {"numeric": {"t/gap": {"n": 4, "n_parsed": 3, "mae": 0.25, "mae_mean": 1.0, "r2": 0.5}}},
               "base": {"numeric": {"t/gap": {"n": 4, "n_parsed": 0, "mae": None, "mae_mean": None, "r2": None}}},
               "uniform": {},
               "maths": {"numeric": {"t/gap": {"n": 4, "n_parsed": 4, "mae": 2.5e46, "mae_mean": 1.0, "r2": -1.26e90}}}}
    md = numeric_markdown(configs)
    assert "| xlora | 0.50 (0.25) 3/4 |" in md
    assert "| maths | -1.3e+90 (2.5e+46) 4/4 |" in md  # an absurd answer does not print 90 digits
    assert "| base | no number (0/4) |" in md
    assert "| uniform | – |" in md
    assert numeric_markdown({"xlora": {}}) == ""
