"""The science suite's evaluation: :func:`xlora.analysis.evaluate.evaluate_files` on a suite split, scored by the
suite's own checker (inverse answers recomputed with RDKit / GFN2-xTB / OpenMM, see :func:`xlora.demo.suite.check`).

``evaluate_split(model_dir, data_dir, split, out_dir)`` writes ``out_dir/<split>/eval.md``, ``eval.json`` (the
``xlora-eval/1`` schema plus the generated answers) and returns the :class:`~xlora.analysis.eval_report.EvalResult`.
The same numbers as ``xlora eval MODEL_DIR --data DATA_DIR/<split>.jsonl --generate N``, except that inverse
answers are checked by physics rather than by exact match with one valid answer.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from xlora.files import atomic_write_text

SPLITS = ("validation", "test", "test_unseen", "composite", "independent")
# prompts written by hand by an author who had not read the suite's wording composer (see its README.md)
INDEPENDENT = Path(__file__).parent / "assets" / "suite" / "independent" / "independent.jsonl"
PHYSICS_TIME_BUDGET_S = 60.0  # one steered pull per mechanics inverse answer at most this long


def suite_checker(record: dict[str, Any], answer: str) -> float:
    """:func:`xlora.demo.suite.check` (graded numeric scores, inverse answers recomputed) for records that carry
    the suite's ``meta``; any other record by its own ``check`` (:func:`~xlora.analysis.eval_data.check_answer`)."""
    from xlora.analysis.eval_data import check_answer
    from xlora.demo import suite

    meta = record.get("meta")
    if isinstance(meta, dict) and meta.get("kind") in ("qm_inverse", "mech_inverse"):
        return _physics_score(answer.strip(), meta["kind"], meta["lo"], meta["hi"])
    if isinstance(meta, dict) and "kind" in meta:
        return suite.check(record, answer)
    return check_answer(record, answer)


@functools.lru_cache(maxsize=4096)
def _physics_score(answer: str, kind: str, lo: float, hi: float) -> float:
    """An inverse answer simulated once (rows often give the same answer; a pull costs 10-20 CPU-s)."""
    from xlora.demo import suite

    record = {"meta": {"kind": kind, "lo": lo, "hi": hi}}
    return suite.check(record, answer, time_budget_s=PHYSICS_TIME_BUDGET_S)


def evaluate_split(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str,
                   out_dir: str | os.PathLike, *, generate: int = 16, max_new_tokens: int = 48,
                   base_dir: str | os.PathLike | None = None, arrow: bool = True,
                   rows: list[str] | None = None, loaded: tuple[Any, Any] | None = None) -> Any:
    """Evaluate the X-LoRA directory ``model_dir`` (over the demo base in ``base_dir``) on
    ``data_dir/<split>.jsonl`` (``independent``: the shipped hand-written set unless ``data_dir`` has one);
    ``generate`` greedy answers per domain are scored; ``rows`` limits the
    configurations (default: all of :func:`~xlora.analysis.evaluate.evaluate`); ``loaded``: the
    ``(model, tokenizer)`` of ``model_dir`` already loaded (several splits, one load)."""
    from xlora.analysis.eval_data import reference_answer
    from xlora.analysis.evaluate import EvalConfig, evaluate_files
    from xlora.demo.base_model import base_model_dir, load_base, load_demo
    from xlora.train.data import tokenize_record

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.jsonl"
    if split == "independent" and not path.is_file():
        path = INDEPENDENT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: write the suite's files first (retrain_suite phase 'data')")
    base = Path(base_dir) if base_dir is not None else base_model_dir()
    t0 = time.perf_counter()
    model, tokenizer = loaded if loaded is not None else load_demo(model_dir, base)
    config = EvalConfig(chat=True, generate=generate, max_new_tokens=max_new_tokens)
    result = evaluate_files(model, tokenizer, [path], config, tokenize_record=tokenize_record,
                            arrow_base=(lambda: load_base(base)[0]) if arrow else None, checker=suite_checker,
                            rows=rows, model_name=f"{model_dir} on {split}")
    out = Path(out_dir) / split
    try:
        result.write(out)
    except ImportError:  # no matplotlib: the tables only
        result.write(out, png=False)
    answers = [{"id": rec.get("id"), "domain": rec.get("domain"), "reference": reference_answer(rec),
                **{row: ans[i] for row, ans in result.answers.items()}} for i, rec in enumerate(result.samples)]
    atomic_write_text(out / "answers.json", json.dumps(answers, indent=1) + "\n")
    print(result.to_markdown(), flush=True)
    print(f"{split}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m xlora.demo.suite_eval MODEL_DIR DATA_DIR OUT_DIR [--splits ...] [--generate N] [--no-arrow]``."""
    import argparse
    import sys

    import torch

    p = argparse.ArgumentParser(prog="python -m xlora.demo.suite_eval", description=main.__doc__)
    p.add_argument("model_dir")
    p.add_argument("data_dir", help="the suite's files (python -m xlora.demo.suite or retrain_suite's data phase)")
    p.add_argument("out_dir")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=["test_unseen", "composite"])
    p.add_argument("--generate", type=int, default=16, help="greedy answers per domain, scored (0: losses only)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rows", nargs="+", default=None, help="configurations (default: all)")
    p.add_argument("--no-arrow", action="store_true", help="skip PEFT's Arrow row")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv if argv is not None else sys.argv[1:])
    if a.threads:
        torch.set_num_threads(a.threads)
    from xlora.demo.base_model import base_model_dir, load_demo

    loaded = load_demo(a.model_dir, base_model_dir())
    for split in a.splits:
        evaluate_split(a.model_dir, a.data_dir, split, a.out_dir, generate=a.generate,
                       max_new_tokens=a.max_new_tokens, arrow=not a.no_arrow, rows=a.rows, loaded=loaded)


if __name__ == "__main__":
    main()
