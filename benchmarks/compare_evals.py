"""Two models evaluated on the same records, compared with intervals: X-LoRA's loss in A over B's and the top-1 own
routing of A minus B's, per split and domain, from the ``eval_records.jsonl`` that ``xlora eval`` (and the suite's
``suite_eval``) write (:func:`xlora.analysis.eval_intervals.paired_runs`, :func:`~.routing_difference`).

    .venv/bin/python benchmarks/compare_evals.py A_EVAL_DIR B_EVAL_DIR --splits test_unseen independent
    # each DIR holds SPLIT/eval_records.jsonl (suite_eval's layout), or is itself one run's folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xlora.analysis.eval_intervals import paired_runs, read_records, routing_difference


def run_folder(root: str, split: str | None) -> Path:
    folder = Path(root) / split if split else Path(root)
    if not (folder / "eval_records.jsonl").is_file():
        raise SystemExit(f"{folder} has no eval_records.jsonl: evaluate with xlora eval (or suite_eval) of this version")
    return folder / "eval_records.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--splits", nargs="+", default=[None], help="subfolders of A and B (default: A and B themselves)")
    ap.add_argument("--row", default="xlora", help="the row compared (default xlora)")
    args = ap.parse_args()
    print(f"A = {args.a}\nB = {args.b}\n\n| split | domain | loss A / B [95 %] | top-1 own A - B [95 %] |\n|---|---|---:|---:|")
    for split in args.splits:
        a, b = read_records(str(run_folder(args.a, split))), read_records(str(run_folder(args.b, split)))
        ratio, routing = paired_runs(a, b, args.row), routing_difference(a, b)
        for d, (r, lo, hi) in ratio.items():
            diff = routing.get(d)
            cell = f"{diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]" if diff else ""
            print(f"| {split or '-'} | {d} | {r:.3f} [{lo:.3f}, {hi:.3f}] | {cell} |")


if __name__ == "__main__":
    main()
