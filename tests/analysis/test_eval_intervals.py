"""Intervals of the evaluation: Wilson against scipy's and textbook values, the paired stratified bootstrap
against a naive resampling loop, exact cases, and the resample counts' bookkeeping."""

from __future__ import annotations

import random

import numpy as np
import pytest

from xlora.analysis.eval_intervals import RecordLosses, loss_ratios, ratio_interval, resample_counts, wilson


@pytest.mark.parametrize(("hits", "n", "low", "high"), [
    (8, 10, 0.4901624715366418, 0.9433178485456248),  # scipy.stats.binomtest(8, 10).proportion_ci("wilson")
    (37, 48, 0.6346073590999655, 0.8669217373308875),
    (0, 5, 0.0, 0.43448246478317476),
    (5, 5, 0.5655175352168252, 1.0),
])
def test_wilson_equals_scipys(hits, n, low, high):
    assert wilson(hits, n) == pytest.approx((low, high), abs=1e-12)


def test_wilson_against_scipy_at_other_levels():
    stats = pytest.importorskip("scipy.stats")
    for hits, n, level in [(3, 7, 0.9), (40, 48, 0.99), (1, 2, 0.5)]:
        ci = stats.binomtest(hits, n).proportion_ci(confidence_level=level, method="wilson")
        assert wilson(hits, n, level) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)


def test_resample_counts_stay_within_each_domain():
    domains = ["a", "b", "a", "c", "b", "a"]
    counts = resample_counts(domains, 500, seed=3)
    assert counts.shape == (500, 6) and counts.dtype == np.int64
    for d, size in (("a", 3), ("b", 2), ("c", 1)):
        cols = [i for i, x in enumerate(domains) if x == d]
        assert (counts[:, cols].sum(1) == size).all()
    assert (counts[:, 3] == 1).all()  # a domain of one record always draws it
    assert np.array_equal(counts, resample_counts(domains, 500, seed=3))
    assert not np.array_equal(counts, resample_counts(domains, 500, seed=4))


def test_a_constant_ratio_has_a_zero_width_interval():
    y = np.array([1.0, 4.0, 2.5, 0.3])
    counts = resample_counts(["a", "a", "b", "b"], 200)
    assert ratio_interval(0.8 * y, y, counts) == pytest.approx((0.8, 0.8, 0.8), rel=1e-12)


def test_a_row_whose_loss_sums_to_zero_leaves_its_cells_out_instead_of_nan():
    """No ratio is defined over a zero loss: the cell is left out (strict JSON, no NaN) and the others stay."""
    import json

    records = [RecordLosses(f"f: line {i}", d, 3, {"xlora": 1.0 + i, "perfect": 0.0 if d == "a" else 2.0})
               for i, d in enumerate(["a", "a", "b", "b"])]
    out = loss_ratios(records, "xlora", ["perfect"], resamples=200)["perfect"]
    assert set(out) == {"b", "mixed"} and out["b"] == pytest.approx([7 / 4, 1.5, 2.0], abs=1e-12)
    assert out["mixed"][0] == pytest.approx(10 / 4) and json.loads(json.dumps(out, allow_nan=False)) == out
    assert ratio_interval(np.ones(3), np.zeros(3), resample_counts(["a"] * 3, 50)) is None
    assert ratio_interval(np.ones(3), np.ones(3), resample_counts(["a"] * 3, 0)) is None  # no resample: no interval


def test_paired_bootstrap_equals_a_naive_resampling_loop():
    """One domain of 40 records: the percentile interval of Σx/Σy against 20,000 resamples drawn with Python's
    random.choices (another generator), within Monte-Carlo error (the two estimate the same quantiles)."""
    rng = np.random.default_rng(0)
    y = rng.uniform(5, 30, 40)
    x = y * rng.normal(0.9, 0.15, 40)
    records = [RecordLosses(f"f: line {i}", "d", 10, {"xlora": float(a), "base": float(b)})
               for i, (a, b) in enumerate(zip(x, y))]
    ours = loss_ratios(records, "xlora", ["base", "xlora"], resamples=20000)["base"]["mixed"]
    pick = random.Random(1)
    naive = []
    for _ in range(20000):
        idx = pick.choices(range(40), k=40)
        naive.append(sum(x[i] for i in idx) / sum(y[i] for i in idx))
    low, high = np.quantile(naive, [0.025, 0.975])
    width = high - low
    assert ours[0] == pytest.approx(x.sum() / y.sum(), rel=1e-12)
    assert abs(ours[1] - low) < 0.03 * width and abs(ours[2] - high) < 0.03 * width
    assert 0.02 < width < 0.2  # a real spread, not a degenerate one


def test_stratification_keeps_a_domains_share():
    """X halves the loss on one domain and ties on the other, constant within each: stratified resamples keep five
    records of each, so the mixed ratio is 0.75 in every resample; resampling all ten records as one domain moves
    records between the two and gives the same point a real interval."""
    def records(label):
        return [RecordLosses(f"f: line {i}", label(i), 1, {"xlora": 0.5 if i < 5 else 1.0, "base": 1.0})
                for i in range(10)]

    cells = loss_ratios(records(lambda i: "halved" if i < 5 else "tied"), "xlora", ["base"])["base"]
    assert cells == {"mixed": pytest.approx([0.75] * 3, rel=1e-12), "halved": pytest.approx([0.5] * 3),
                     "tied": pytest.approx([1.0] * 3)}
    ratio, low, high = loss_ratios(records(lambda i: "one"), "xlora", ["base"])["base"]["mixed"]
    assert ratio == pytest.approx(0.75) and low < 0.70 and high > 0.80


def test_rows_without_shared_records_are_left_out():
    records = [RecordLosses("f: line 1", "a", 3, {"xlora": 1.0, "base": 2.0}),
               RecordLosses("f: line 2", "b", 3, {"xlora": 1.0, "base": 2.0, "oracle": 1.5})]
    out = loss_ratios(records, "xlora", ["base", "oracle", "arrow"], resamples=50)
    assert list(out) == ["base", "oracle"] and out["oracle"]["mixed"] == pytest.approx([2 / 3] * 3)
    assert list(out["oracle"]) == ["mixed", "b"]


def test_records_file_round_trips_and_pairs_two_runs(tmp_path):
    import json

    from xlora.analysis.eval_intervals import paired_runs, read_records

    a = [RecordLosses(f"d.jsonl: line {i}", "p" if i % 2 else "q", 3 + i, {"xlora": 1.0 + i, "base": 2.0},
                      record_id=f"r{i}", top1="p") for i in range(6)]
    path = tmp_path / "eval_records.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in a))
    assert read_records(str(path)) == a
    b = [RecordLosses(r.where, r.domain, r.tokens, {"xlora": r.nll["xlora"] / 1.05}) for r in reversed(a)]
    cells = paired_runs(a, b)
    assert set(cells) == {"mixed", "p", "q"} and all(c == pytest.approx([1.05] * 3) for c in cells.values())
    with pytest.raises(ValueError, match="did not score the same records"):
        paired_runs(a, b[1:])
    b[0].tokens += 1
    with pytest.raises(ValueError, match=r"line 5: the runs differ in scored tokens \(8 vs 9\)"):
        paired_runs(a, b)
    path.write_text(json.dumps(a[0].to_json()) + "\n{\"where\": 1}\n")
    with pytest.raises(ValueError, match="line 2 is not an eval_records.jsonl line"):
        read_records(str(path))


def test_routing_difference_is_paired_per_domain():
    """Twenty records of p: a routes 18 to p, b 14, and b's hits are a subset of a's, so every resample's
    difference is >= 0; the point is 0.2 and the interval lies within the changed records' share."""
    from xlora.analysis.eval_intervals import routing_difference

    a = [RecordLosses(f"f: line {i}", "p", 1, {}, top1="p" if i < 18 else "q") for i in range(20)]
    b = [RecordLosses(r.where, "p", 1, {}, top1="p" if i < 14 else "q") for i, r in enumerate(a)]
    b.append(RecordLosses("f: line 99", "q", 1, {}, top1=None))
    a.append(RecordLosses("f: line 99", "q", 1, {}, top1="q"))
    delta, low, high = routing_difference(a, b)["p"]
    assert delta == pytest.approx(0.2) and 0.0 <= low < 0.2 < high <= 0.45
    assert list(routing_difference(a, b)) == ["p"]  # q has no top1 in b
    assert routing_difference(b[:-1] + a[-1:], b[:-1] + a[-1:])["q"] == [0.0, 0.0, 0.0]
