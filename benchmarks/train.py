"""Head-training speed and memory: our X-LoRA vs PEFT's XLoraModel, same optimiser, batch and model.

One training step = the two-pass forward with labels, backward (gradients reach the head through
every layer of the main pass), AdamW on the head. Both models start from the same head weights
(PEFT's classifier copied into ours); the losses of the first step are compared.

    python benchmarks/train.py            # hidden 512, 8 layers, 4 experts r=16, batch 4 x 128
    python benchmarks/train.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from forward import build_ours, build_peft, make_base, make_experts, maxrss_bytes, tokens  # noqa: E402


def head_params(model) -> list[torch.nn.Parameter]:  # noqa: ANN001
    return [p for p in model.parameters() if p.requires_grad]


def step(model, opt, x: torch.Tensor) -> float:  # noqa: ANN001
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def build_pair(args: argparse.Namespace, dirs: list[Path]):  # noqa: ANN201
    peft_model = build_peft(make_base(args), dirs, args.hidden)
    ours = build_ours(make_base(args), dirs)
    ours.head.layers.load_state_dict(peft_model.base_model.internal_xlora_classifier.layers.state_dict())
    ours.train()
    peft_model.train()
    return ours, peft_model


def probe(args: argparse.Namespace) -> None:
    """In a fresh process: build one model, run a few training steps, print peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    dirs = sorted(Path(args.adapters).glob("expert*"), key=lambda p: int(p.name[6:]))[: args.experts]
    import peft  # noqa: F401

    before = maxrss_bytes()
    if args.probe == "ours":
        model = build_ours(make_base(args), dirs).train()
    else:
        model = build_peft(make_base(args), dirs, args.hidden).train()
    opt = torch.optim.AdamW(head_params(model), lr=1e-4)
    x = tokens(args.batch, args.seq, args.vocab)
    for _ in range(2):
        step(model, opt, x)
    print(json.dumps({"kind": args.probe, "peak": maxrss_bytes(), "before_build": before}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--probe", choices=["ours", "peft"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adapters", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.seq, args.steps = 128, 344, 2, 1000, 32, 3
    if args.probe:
        probe(args)
        return 0
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    print(f"# xlora train benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"# Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.experts} experts r=16 on "
          f"all 7 projections; batch {args.batch} x {args.seq}; AdamW on the head (depth 1)")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_experts(make_base(args), Path(tmp), args.experts)
        ours, theirs = build_pair(args, dirs)
        opts = {"ours": torch.optim.AdamW(head_params(ours), lr=1e-4),
                "peft": torch.optim.AdamW(head_params(theirs), lr=1e-4)}
        models = {"ours": ours, "peft": theirs}
        x = tokens(args.batch, args.seq, args.vocab)
        first = {name: step(m, opts[name], x) for name, m in models.items()}
        step(ours, opts["ours"], x)
        step(theirs, opts["peft"], x)
        times: dict[str, list[float]] = {"ours": [], "peft": []}
        for i in range(args.steps):
            order = ["ours", "peft"] if i % 2 == 0 else ["peft", "ours"]
            for name in order:
                t0 = time.perf_counter()
                step(models[name], opts[name], x)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {}
        for kind in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--probe", kind, "--adapters", tmp, "--threads", str(args.threads)]
            for k in ("hidden", "intermediate", "layers", "heads", "vocab", "experts", "batch", "seq"):
                cmd += [f"--{k}", str(getattr(args, k))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            mem[kind] = json.loads(out.strip().splitlines()[-1])["peak"]
    print(f"first-step loss: ours {first['ours']:.6f}, PEFT {first['peft']:.6f} (same head, same batch)")
    print(f"{'model':<6}{'s/step':>10}{'steps/s':>10}{'peak RSS MiB':>15}")
    for k in ("ours", "peft"):
        print(f"{k:<6}{med[k]:>10.3f}{1 / med[k]:>10.2f}{mem[k] / 2**20:>15.0f}")
    print(f"ours is {med['peft'] / med['ours']:.2f}x faster per step; peak memory ours/PEFT "
          f"{mem['ours'] / mem['peft']:.2f}")
    summary = {"args": vars(args), "median_s": med, "peak_rss": mem, "first_loss": first,
               "speedup": med["peft"] / med["ours"]}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print("JSON " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
