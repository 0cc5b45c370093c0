"""Two models evaluated on the same records, compared with intervals: now ``xlora compare A B`` (this script is kept
for the commands recorded in BENCHMARKS.md and calls the same function,
:func:`xlora.analysis.eval_intervals.compare_runs`).

    .venv/bin/python benchmarks/compare_evals.py A_EVAL_DIR B_EVAL_DIR --splits test_unseen independent
    # each DIR holds SPLIT/eval_records.jsonl (suite_eval's layout), or is itself one run's folder
"""

from __future__ import annotations

import sys

from xlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
