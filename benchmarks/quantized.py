"""Quantised and half-precision bases under X-LoRA, on the demo's SmolLM2-135M with its experts and head.

For each base kind — float32, bfloat16, bitsandbytes int8, bitsandbytes nf4 (4-bit, float32
compute) — in one run:

- peak memory (``VmHWM``) of a fresh subprocess that loads the base, builds the X-LoRA model and
  runs one forward (``--probe KIND``, internal);
- forward time of X-LoRA (both passes) on ``--batch x --seq`` tokens, median of ``--repeats``,
  the kinds interleaved in a rotating order within each repeat so machine noise hits all alike;
- the demo's mixed completion loss of X-LoRA on the test split (``--n`` records per domain): what
  quantisation costs in quality.

    .venv/bin/python benchmarks/quantized.py             # ~3-6 min on 2 cores
    .venv/bin/python benchmarks/quantized.py --quick     # smoke run

Needs the demo's base model (``xlora demo`` converts it once) and ``pip install -e '.[quant,demo]'``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

KINDS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"load_in_8bit": True},
         "nf4": {"load_in_4bit": True}}
MiB = 1024 * 1024


def build(kind: str):
    from xlora import XLoraModel
    from xlora.demo.base_model import base_model_dir
    from xlora.demo.run import ASSETS
    from xlora.saving import base_load_kwargs, load_local

    base = load_local(transformers.AutoModelForCausalLM, str(base_model_dir()), "the demo base model",
                      "run `xlora demo` once to convert it", **base_load_kwargs(**KINDS[kind])).eval()
    return XLoraModel.from_pretrained(ASSETS, base_model=base).eval()


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def probe(kind: str, batch: int, seq: int) -> None:
    model = build(kind)
    with torch.inference_mode():
        model(input_ids=torch.randint(10, 1000, (batch, seq)))
    print("PROBE " + json.dumps({"kind": kind, "peak": vm_hwm()}))


def peak_memory(kind: str, batch: int, seq: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--probe", kind, "--batch", str(batch), "--seq", str(seq)],
                         capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[6:])["peak"]


def time_forwards(models: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                models[n](input_ids=x)
        for r in range(repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                t0 = time.perf_counter()
                models[n](input_ids=x)
                times[n].append(time.perf_counter() - t0)
    return times


def mixed_loss(model, tokenizer, n: int) -> float:
    from xlora.demo import domains
    from xlora.demo.evaluate import XLORA, losses

    records = domains.generate_mixture("test", n, seed=0)
    loss, _, _ = losses(model, tokenizer, records, [XLORA], batch_size=8)
    return loss[XLORA]["mixed"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--n", type=int, default=16, help="test records per domain for the loss")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.batch, args.seq)
        return 0
    if args.quick:
        args.repeats, args.warmup, args.n, args.seq = 3, 1, 2, 32
    from xlora.demo.base_model import base_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_model_dir()))
    print(f"# quantised bases under X-LoRA, SmolLM2-135M-Instruct + the 5 demo experts; {platform.platform()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, {_dt.date.today()}")
    models = {k: build(k) for k in KINDS}
    x = torch.randint(10, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times = time_forwards(models, x, args.warmup, args.repeats)
    rows = {}
    for k, m in models.items():
        rows[k] = {"forward_ms": 1000 * statistics.median(times[k]),
                   "spread": max(times[k]) / min(times[k]),
                   "loss": mixed_loss(m, tokenizer, args.n)}
    del models
    for k in KINDS:
        rows[k]["peak_mib"] = peak_memory(k, args.batch, args.seq) / MiB
    ref = rows["float32"]
    print(f"\nforward {args.batch}x{args.seq} (both passes), median of {args.repeats}; loss: mixed completion "
          f"loss on {args.n} test records per domain")
    print(f"{'base':<10}{'peak MiB':>10}{'forward ms':>12}{'x fp32':>8}{'spread':>8}{'loss':>9}{'d loss':>9}")
    for k, r in rows.items():
        print(f"{k:<10}{r['peak_mib']:>10.0f}{r['forward_ms']:>12.1f}{r['forward_ms'] / ref['forward_ms']:>8.2f}"
              f"{r['spread']:>8.2f}{r['loss']:>9.4f}{r['loss'] - ref['loss']:>+9.4f}")
    print("JSON " + json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
