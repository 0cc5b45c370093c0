"""Cost of recording the scalings: generate and forward with recording off vs on.

Same model as ``forward.py`` (random-init float32 Llama, hidden 512, intermediate 1376, 8 layers,
8 heads, vocab 8000; E rank-16 experts on all seven projections, made with PEFT), built in-process.

- generate: greedy, ``--prompt`` tokens, ``--new`` new tokens, batch 1, without vs with
  ``observer=ScalingsLog`` (every step appended to the log);
- forward: ``--batch x --seq``, plain vs ``observer=`` a :class:`xlora.analysis.ScalingsLog`.

Medians over ``--repeats`` interleaved calls (off/on alternate who goes first) after ``--warmup``;
the ratio on/off should be ~1.00. Runs in well under 2 minutes on 2 cores.

    .venv/bin/python benchmarks/inspect_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

import xlora  # noqa: E402
from xlora.analysis import ScalingsLog  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace, root: Path) -> xlora.XLoraModel:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=8000, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )).eval()
    experts = {}
    for i in range(args.experts):
        torch.manual_seed(1000 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                            init_lora_weights=False))
        pm.save_pretrained(str(root / f"e{i}"))
        experts[f"e{i}"] = str(root / f"e{i}")
    return xlora.XLoraModel(base, xlora.XLoraConfig(experts=experts)).eval()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def compare(label: str, off, on, warmup: int, repeats: int) -> None:
    for _ in range(warmup):
        off(), on()
    t_off, t_on = [], []
    for r in range(repeats):
        pair = [(off, t_off), (on, t_on)]
        for fn, acc in (pair if r % 2 == 0 else pair[::-1]):
            acc.append(timed(fn))
    a, b = statistics.median(t_off), statistics.median(t_on)
    print(f"{label:<44} off {a:8.1f} ms   on {b:8.1f} ms   on/off {b / a:5.3f}   "
          f"(min on/off {min(t_on) / min(t_off):5.3f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens for generate")
    p.add_argument("--new", type=int, default=24, help="new tokens per generate")
    p.add_argument("--batch", type=int, default=1, help="forward batch")
    p.add_argument("--seq", type=int, default=128, help="forward sequence length")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable ratios on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"# xlora inspect overhead  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"threads {torch.get_num_threads()}  load {os.getloadavg()[0]:.2f}")
    print(f"# Llama 512/1376/8 layers/vocab 8000 float32, E={args.experts} rank-16 experts; "
          f"median of {args.repeats} (after {args.warmup} warm-up)")
    with tempfile.TemporaryDirectory(prefix="xlora-inspect-bench-") as tmp:
        model = build(args, Path(tmp))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 8000, (1, args.prompt), generator=g)
    x = torch.randint(3, 8000, (args.batch, args.seq), generator=g)
    gen = {"input_ids": prompt, "max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False,
           "pad_token_id": 0}

    def gen_off() -> None:
        model.generate(**gen)

    def gen_on() -> None:
        model.generate(**gen, observer=ScalingsLog.for_model(model))

    def fwd_off() -> None:
        model(input_ids=x)

    def fwd_on() -> None:
        model(input_ids=x, observer=ScalingsLog.for_model(model))

    with torch.inference_mode():
        compare(f"generate 1x{args.prompt} +{args.new} tokens (observer=log)", gen_off, gen_on,
                args.warmup, args.repeats)
        compare(f"forward {args.batch}x{args.seq} (observer=log)", fwd_off, fwd_on, args.warmup, args.repeats)
    print(f"# total {time.perf_counter() - t_start:.0f}s, load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
