"""Prompt granularity as shipped (folded into A with a top-k head), against the base and the unfolded path.

A SmolLM2-shaped random float32 Llama (see ``benchmarks/topk.py``) with five rank-8 experts on all
seven projections (the demo's layout: 210 adapted modules), decoding at prompt granularity. Rows,
per batch size, per decoded token (interleaved repetitions, rotating order, medians and max/min):

- ``base``: ``disable_adapters()``, exactly the base model;
- ``prompt``: ``granularity="prompt"`` as shipped: with ``--top-k K`` the chosen experts folded into ``A``
  (``A' = diag(c)·A`` per sequence over their columns only, two matmuls per module); a dense head (the
  default, as the demo ships) scales the shared ``A``'s output, since folding all experts measured no faster;
- ``unfolded``: the same fixed scalings passed as ``scalings=`` (the per-token coefficient path, every expert).

Then a ``torch.profiler`` table of one ``prompt`` decoding step at batch 1 (where the time goes), and
the exactness of ``prompt`` against ``unfolded`` logits.

    .venv/bin/python benchmarks/fold.py                 # ~2 min on 2 idle cores
    .venv/bin/python benchmarks/fold.py --top-k 2       # the folded path: 2 of 5 experts
    .venv/bin/python benchmarks/fold.py --reps 2 --new 4 --batches 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import topk
import torch
from topk import smollm2_shaped, write_experts

from xlora import XLoraModel


def build(dirs: list[Path], E: int = 5, top_k: int | None = None) -> XLoraModel:
    return topk.build(E, dirs, top_k=top_k)  # None: dense, every expert, as the demo ships


@torch.inference_mode()
def decode(model: XLoraModel, ids: torch.Tensor, new: int, mode: str) -> tuple[float, torch.Tensor]:
    """Seconds per decoded token after a prompt-granularity prefill, and the last logits."""
    cache = model.new_cache(granularity="prompt")
    if mode == "base":
        with model.disable_adapters():
            out = model(input_ids=ids, cache=cache, logits_to_keep=1)
    else:
        out = model(input_ids=ids, cache=cache, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new):
        if mode == "base":
            with model.disable_adapters():
                out = model(input_ids=nxt, cache=cache, logits_to_keep=1)
        elif mode == "prompt":
            out = model(input_ids=nxt, cache=cache, logits_to_keep=1)
        else:
            out = model(input_ids=nxt, cache=cache, logits_to_keep=1, scalings=cache.fixed_scalings)
        nxt = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new, out.logits[:, -1]


@torch.inference_mode()
def profile(model: XLoraModel, ids: torch.Tensor) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cache = model.new_cache(granularity="prompt")
    nxt = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    model(input_ids=nxt, cache=cache, logits_to_keep=1)  # folds once (top-k)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(input_ids=nxt, cache=cache, logits_to_keep=1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=None, help="a top-k head (default: dense, as the demo ships)")
    args = ap.parse_args()
    print(f"load: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = build(write_experts(smollm2_shaped(), Path(tmp), rank=8), top_k=args.top_k)
    modes = ["base", "prompt", "unfolded"]
    for b in args.batches:
        ids = torch.randint(0, 49152, (b, args.prompt), generator=torch.Generator().manual_seed(b))
        times: dict[str, list[float]] = {m: [] for m in modes}
        logits = {}
        for rep in range(args.reps + 1):  # rep 0 warms up
            for m in modes[rep % 3:] + modes[: rep % 3]:
                t, logits[m] = decode(model, ids, args.new, m)
                if rep:
                    times[m].append(t)
        base = statistics.median(times["base"])
        print(f"\nbatch {b}, prompt {args.prompt}, {args.new} new tokens, {args.reps} interleaved reps")
        for m in modes:
            med = statistics.median(times[m])
            print(f"  {m:>8}: {med * 1e3:7.1f} ms/token  spread {max(times[m]) / min(times[m]):.2f}  "
                  f"{med / base:.2f}x base")
        print(f"  max |prompt - unfolded logits| = {(logits['prompt'] - logits['unfolded']).abs().max().item():.1e}")
    print(f"\none prompt-granularity decoding step at batch 1, top_k={args.top_k} (3 steps profiled):")
    print(profile(model, torch.randint(0, 49152, (1, args.prompt), generator=torch.Generator().manual_seed(1))))


if __name__ == "__main__":
    main()
