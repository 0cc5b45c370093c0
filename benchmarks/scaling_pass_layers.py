"""The speed/quality curve of ``scaling_pass_layers``: one head per ``k`` on the demo's SmolLM2-135M.

For each ``k`` (default N/4, N/2, N of the 30 layers) a head is trained with the shipped head's recipe
(:func:`xlora.demo.retrain.train_head`: global scalings, 150 AdamW steps of 8 records on the seen
phrasings of all five domains, seed 0) over the shipped experts, ``scaling_pass_layers=k``; for
``k = N`` that recipe *is* the shipped head, which is used as it is (``--retrain-full`` trains it
again). Then, on the same records of the ``test_unseen`` split (phrasings no head or expert saw):

- mixed completion loss of X-LoRA (the answer tokens), and of the uniform mixture for reference;
- routing: per domain, the fraction of records whose top-1 expert (mean scalings over the answer
  tokens, layers averaged) is the own expert;
- decode speed: per-token time at batch 1 (16-token prompt, ``--new`` greedy tokens) relative to the
  base model, the k heads and the base interleaved in one loop (medians of ``--repeats``).

    .venv/bin/python benchmarks/scaling_pass_layers.py               # ~12 min on 2 idle cores
    .venv/bin/python benchmarks/scaling_pass_layers.py --steps 20 --n 4 --ks 8 30 --retrain-full  # smoke

Heads are written to ``--work`` (default ``$XLORA_CACHE/scaling_pass_layers``) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
N_LAYERS = 30  # SmolLM2-135M
sys.path.insert(0, str(Path(__file__).parent))

def train_head(k: int, steps: int, work: Path, retrain_full: bool) -> Path:
    """A directory holding the head for ``k`` (config, head, ``experts/`` copied from the assets)."""
    import shutil

    from xlora.demo.retrain import train_head as demo_train_head
    from xlora.demo.run import ASSETS
    from xlora.saving import HEAD_FILE

    if k == N_LAYERS and not retrain_full:
        return ASSETS
    run = work / f"k{k}-steps{steps}"
    if (run / HEAD_FILE).is_file():
        return run
    if not (run / "experts").is_dir():
        shutil.copytree(ASSETS / "experts", run / "experts")
    t0 = time.perf_counter()
    stats = demo_train_head(run, steps=steps, work_dir=work / f"train-k{k}", options={"scaling_pass_layers": k})
    print(f"# k={k}: trained {stats['steps']} steps in {time.perf_counter() - t0:.0f}s, "
          f"eval loss {stats['eval_loss']:.4f}", flush=True)
    return run


def quality(run: Path, n: int) -> dict:
    from xlora import XLoraModel
    from xlora.demo import domains
    from xlora.demo.base_model import load_base
    from xlora.demo.evaluate import UNIFORM, XLORA, loss_pass

    base, tok = load_base(None)
    model = XLoraModel.from_pretrained(run, base_model=base).eval()
    records = domains.generate_mixture("test_unseen", n, seed=0, domains=list(model.xlora_config.expert_names))
    loss, routing, _, top1 = loss_pass(model, tok, records, [XLORA, UNIFORM])
    return {"loss": loss[XLORA]["mixed"], "uniform": loss[UNIFORM]["mixed"], "top1": top1, "routing": routing}


def speed(runs: dict[int, Path], new: int, repeats: int) -> dict[str, float]:
    from generate_smollm2 import per_token_ms

    from xlora import XLoraModel
    from xlora.demo.base_model import load_base

    base, tok = load_base(None)
    models = {"base": base} | {f"k={k}": XLoraModel.from_pretrained(r, base_model=load_base(None)[0]).eval()
                               for k, r in runs.items()}
    enc = tok(["Question: what is the molecular weight of the peptide ACDEFGHIKLMN?"], return_tensors="pt")
    enc = {key: v[:, -16:] for key, v in enc.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            def run(clock, m=models[name]):
                with torch.inference_mode():
                    m.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                               streamer=clock)
            times[name].append(per_token_ms(run, new))
    ref = statistics.median(times["base"])
    return {name: statistics.median(t) / ref for name, t in times.items()}


def main() -> int:
    from xlora.demo.base_model import cache_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[7, 15, 30])
    ap.add_argument("--steps", type=int, default=150, help="head steps (the shipped head's: 150)")
    ap.add_argument("--retrain-full", action="store_true", help=f"train k={N_LAYERS} too instead of using the shipped head")
    ap.add_argument("--n", type=int, default=24, help="test_unseen records per domain")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default=None)
    ap.add_argument("--no-speed", action="store_true", help="losses and routing only (the speed column is left out)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else cache_root() / "scaling_pass_layers"
    print(f"# scaling_pass_layers curve on SmolLM2-135M (30 layers), {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}", flush=True)
    runs = {k: train_head(k, args.steps, work, args.retrain_full) for k in args.ks}
    rows = {k: quality(r, args.n) for k, r in runs.items()}
    ratio = {} if args.no_speed else speed(runs, args.new, args.repeats)
    print(f"\n{'k':>4}{'passes/token':>14}{'x base':>9}{'loss':>9}{'uniform':>9}  top-1 own-expert routing")
    for k, row in rows.items():
        share = ", ".join(f"{d[:4]} {v:.2f}" for d, v in row["top1"].items())
        print(f"{k:>4}{1 + k / N_LAYERS:>14.2f}{ratio.get(f'k={k}', float('nan')):>9.2f}{row['loss']:>9.4f}{row['uniform']:>9.4f}  {share}")
    print("\nmean weight over each domain's answer tokens (rows: domain; columns: expert)")
    for k, row in rows.items():
        for d, weights in row["routing"].items():
            print(f"k={k:<3} {d:<12} " + "  ".join(f"{e[:4]} {w:.3f}" for e, w in weights.items()))
    print("JSON " + json.dumps({"args": vars(args), "rows": {str(k): v for k, v in rows.items()}, "speed": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
