"""The speed/quality curve of ``scaling_pass_layers``: one head per ``k`` on the demo's SmolLM2-135M.

For each ``k`` (default N/4, N/2, N of the 30 layers) a head is trained with the same recipe (the
shipped head's options, ``--steps`` AdamW steps of 8 records, the demo's training split over the four
shipped experts, seed 0), then measured on the same test records:

- mixed completion loss of X-LoRA (the answer tokens), and of the uniform mixture for reference;
- routing: per domain, the share of the own expert in the mean scalings over answer tokens, and
  whether it is the top-1 expert;
- decode speed: per-token time at batch 1 (16-token prompt, ``--new`` greedy tokens) relative to the
  base model, the k heads and the base interleaved in one loop (medians of ``--repeats``).

    .venv/bin/python benchmarks/scaling_pass_layers.py               # ~30 min on 2 idle cores
    .venv/bin/python benchmarks/scaling_pass_layers.py --steps 20 --n 4 --ks 8 30   # smoke run

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
sys.path.insert(0, str(Path(__file__).parent))

RECIPE = {"head_depth": 2, "head_hidden_size": 256, "layerwise_scalings": True, "head_dropout": 0.1,
          "per_device_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 5, "max_length": 192, "seed": 0}


def snapshot_experts(assets: Path, work: Path) -> dict[str, str]:
    """The shipped experts, copied once so that the curve is measured over one fixed set."""
    import shutil

    from xlora import XLoraConfig

    names = list(XLoraConfig.from_json_file(assets / "xlora_config.json").experts)
    out = {}
    for name in names:
        dst = work / "experts" / name
        if not dst.is_dir():
            shutil.copytree(assets / "experts" / name, dst)
        out[name] = str(dst.resolve())
    return out


def train_head(k: int, steps: int, work: Path) -> Path:
    from xlora.demo import domains
    from xlora.demo.base_model import base_model_dir
    from xlora.demo.run import ASSETS
    from xlora.train.config import TrainConfig
    from xlora.train.trainer import train

    run = work / f"k{k}"
    if (run / "xlora_head.safetensors").is_file():
        return run
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    experts = snapshot_experts(ASSETS, work)
    records = domains.generate_mixture("train", steps * 8 // len(experts) + 1, seed=1, domains=list(experts))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = TrainConfig.from_dict({**RECIPE, "base_model": str(base_model_dir()), "train_file": str(data / "train.jsonl"),
                                 "output_dir": str(run), "experts": experts, "max_steps": steps, "save_every": 1000,
                                 "log_every": 10, "progress": False, "overwrite": True,
                                 "scaling_pass_layers": k})
    t0 = time.perf_counter()
    result = train(cfg)
    print(f"# k={k}: trained {result.steps} steps in {time.perf_counter() - t0:.0f}s, "
          f"train loss {result.train_loss:.4f}", flush=True)
    return run


def quality(run: Path, n: int) -> dict:
    from xlora import XLoraModel
    from xlora.demo import domains
    from xlora.demo.base_model import load_base
    from xlora.demo.evaluate import UNIFORM, XLORA, losses

    base, tok = load_base(None)
    model = XLoraModel.from_pretrained(run, base_model=base).eval()
    records = domains.generate_mixture("test", n, seed=0, domains=list(model.xlora_config.expert_names))
    loss, routing, _ = losses(model, tok, records, [XLORA, UNIFORM])
    own = {d: routing[d][d] for d in routing}
    top1 = {d: max(routing[d], key=routing[d].get) == d for d in routing}
    return {"loss": loss[XLORA]["mixed"], "uniform": loss[UNIFORM]["mixed"], "own_share": own, "top1": top1}


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
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=16, help="test records per domain")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work) if args.work else cache_root() / "scaling_pass_layers"
    print(f"# scaling_pass_layers curve on SmolLM2-135M (30 layers), {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d')}", flush=True)
    runs = {k: train_head(k, args.steps, work) for k in args.ks}
    rows = {k: quality(r, args.n) for k, r in runs.items()}
    ratio = speed(runs, args.new, args.repeats)
    print(f"\n{'k':>4}{'passes/token':>14}{'x base':>9}{'loss':>9}{'uniform':>9}  own-expert share (top-1)")
    for k, row in rows.items():
        share = ", ".join(f"{d[:4]} {v:.2f}{'*' if row['top1'][d] else ''}" for d, v in row["own_share"].items())
        print(f"{k:>4}{1 + k / 30:>14.2f}{ratio[f'k={k}']:>9.2f}{row['loss']:>9.4f}{row['uniform']:>9.4f}  {share}")
    print("JSON " + json.dumps({"args": vars(args), "rows": {str(k): v for k, v in rows.items()}, "speed": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
