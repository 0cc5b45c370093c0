"""What one row of the evaluation table costs on the demo's model, with and without this session's savings.

The demo model (SmolLM2-135M-Instruct with the seven suite experts and the shipped head; the converted base must
be cached: run ``xlora demo`` once) scores the demo's sample (4 records per domain, 28 records, batches of 8
sorted by length, as the engine does). One loss pass over all of them, per row:

- ``base folded``: ``scalings="zero"`` as shipped (folded: no expert matmul); ``base dense``: the same zeros
  per token (``[b, t, L, E]``, never folded: every expert computed and multiplied by 0); ``base disabled``:
  ``disable_adapters()``;
- ``expert folded`` / ``expert dense``: the chemistry expert alone (folded: its 16 columns of 112);
- ``uniform folded`` / ``uniform dense``: ``1/E`` each (every expert weighted: ``SharedFold`` leaves it dense, so
  the two are the same code, a check on the noise);
- ``xlora``: the head's own forward (scaling pass + main pass); ``xlora shared``: the main pass with the head
  on given scaling-pass states (what :class:`~xlora.analysis.evaluate.SharedScalingPass` does when the base
  row ran), i.e. what the X-LoRA row costs on top of the base row.

Repetitions are interleaved (rotating order); medians and max/min per row; ratios to ``base disabled``.

    .venv/bin/python benchmarks/eval_rows.py            # ~4 min on 2 idle cores
    .venv/bin/python benchmarks/eval_rows.py --reps 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xlora.analysis.eval_data import completion_loss, left_padded
from xlora.demo.base_model import base_model_dir
from xlora.demo.evaluate import demo_records
from xlora.demo.run import SUITE_ASSETS, demo_sample, load_demo
from xlora.generation import pad_token_id


def batches(model, tok, n_per_domain: int, batch_size: int = 8) -> list[dict]:
    records, _ = demo_sample(n_per_domain)
    ex = sorted((r.example for r in demo_records(records, tok, 2048)), key=lambda e: len(e.input_ids))
    return [left_padded(ex[i:i + batch_size], pad_token_id(tok)) for i in range(0, len(ex), batch_size)]


def per_token(model, spec, batch) -> torch.Tensor:
    s = model.resolve_scalings(spec)
    return s.expand(*batch["input_ids"].shape, *s.shape).clone()


@torch.no_grad()
def run(model, name: str, bs: list[dict]) -> float:
    t = time.perf_counter()
    for b in bs:
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
        kind, _, how = name.partition(" ")
        if name == "base disabled":
            with model.disable_adapters():
                completion_loss(model, b, "none")
        elif kind == "xlora":
            if how == "shared":  # the scaling pass's states come with the base row's forward: only the head runs
                start = time.perf_counter()
                states = model.scaling_pass(**inputs)
                t += time.perf_counter() - start  # not counted: the base row computed them
                s = model.compute_scalings(hidden=states, attention_mask=b["attention_mask"])
                completion_loss(model, b, "none", scalings=s)
            else:
                completion_loss(model, b, "none")
        else:
            spec = {"base": "zero", "expert": "chemistry", "uniform": "uniform"}[kind]
            completion_loss(model, b, "none", scalings=spec if how == "folded" else per_token(model, spec, b))
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("-n", type=int, default=4, help="records per domain (the demo's default: 4)")
    args = p.parse_args()
    model, tok = load_demo(SUITE_ASSETS, base_model_dir())
    bs = batches(model, tok, args.n)
    rows = ["base disabled", "base folded", "base dense", "expert folded", "expert dense", "uniform folded",
            "uniform dense", "xlora", "xlora shared"]
    run(model, "base folded", bs[:1])  # warm-up
    times: dict[str, list[float]] = {r: [] for r in rows}
    for rep in range(args.reps):
        for r in rows[rep % len(rows):] + rows[:rep % len(rows)]:
            times[r].append(run(model, r, bs))
    ref = statistics.median(times["base disabled"])
    print(f"{sum(b['input_ids'].numel() for b in bs)} padded tokens in {len(bs)} batches, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps\n")
    print("| row | median s | min–max s | / base disabled |\n|---|---:|---:|---:|")
    for r in rows:
        m = statistics.median(times[r])
        print(f"| {r} | {m:.2f} | {min(times[r]):.2f}–{max(times[r]):.2f} | {m / ref:.3f} |")


if __name__ == "__main__":
    main()
