"""The GPU checks of issue 22, in one script: exits 0 with a message where there is no CUDA device.

On CUDA (or ``--device``), with a SmolLM2-shaped random model (``--tiny``: a 2-layer one, for a
smoke run on any device):

1. PEFT parity: one-hot scalings on expert 0 equal PEFT's LoRA model with that adapter alone
   (float32, max |logit difference|);
2. exact cached generation: greedy tokens with the dual cache equal recomputation without a cache,
   at token and prompt granularity (float32);
3. ratios in bfloat16 at batch 1/8/32, per decoded token (interleaved repetitions, medians): token
   and prompt granularity (5 rank-8 experts) over the base; top-2 at E = 64 over top-2 at E = 4.

    .venv/bin/python benchmarks/gpu.py                  # on a CUDA machine
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny --batches 1   # smoke run anywhere
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

NO_GPU = "no CUDA device: benchmarks/gpu.py checks nothing here (run it on a GPU machine, or pass --device cpu)"


def base_model(tiny: bool, seed: int = 0):
    from topk import smollm2_shaped
    from transformers import LlamaConfig, LlamaForCausalLM

    if not tiny:
        return smollm2_shaped(seed)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()


def build(base, dirs: list[Path], E: int, device: str, dtype: torch.dtype, **cfg):
    from topk import DISTINCT

    from xlora import XLoraConfig, XLoraModel

    config = XLoraConfig(experts={f"x{e}": str(dirs[e % DISTINCT]) for e in range(E)}, head_depth=1, **cfg)
    model = XLoraModel(copy.deepcopy(base).to(device, dtype), config).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.05 if dtype == torch.bfloat16 else 0.5)
    return model


@torch.inference_mode()
def parity(base, dirs: list[Path], device: str) -> float:
    from peft import PeftModel

    ours = build(base, dirs, 2, device, torch.float32)
    peft = PeftModel.from_pretrained(copy.deepcopy(base).to(device), str(dirs[0])).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    return (ours(input_ids=ids, scalings=0).logits - peft(input_ids=ids).logits).abs().max().item()


@torch.inference_mode()
def cached_generation(base, dirs: list[Path], device: str) -> dict[str, tuple[bool, float]]:
    """Per granularity: (cached tokens == uncached tokens, max |logit difference|)."""
    from xlora.generation import StepRecorder

    model = build(base, dirs, 5, device, torch.float32, top_k=2)
    ids = torch.randint(0, base.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for granularity in ("token", "prompt"):
        kwargs = dict(input_ids=ids, max_new_tokens=16, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        rec = StepRecorder()
        cached = model.generate(**kwargs, granularity=granularity, observer=rec)
        if granularity == "token":
            ref_seq, ref_logits = (r := model.generate(**kwargs, use_cache=False)).sequences, r.logits
        else:  # recompute each step: the prompt's own scalings, then the reduced ones held fixed
            prompt_s, fixed = rec.steps[0], rec.steps[1]  # [b, t, L, E], [b, 1, L, E]
            ref_seq, ref_logits = ids, []
            for step in range(16):
                s = torch.cat([prompt_s, fixed.expand(-1, step, -1, -1)], 1)
                ref_logits.append(model(input_ids=ref_seq, scalings=s).logits[:, -1])
                ref_seq = torch.cat([ref_seq, ref_logits[-1].argmax(-1, keepdim=True)], 1)
        diff = max((a - b).abs().max().item() for a, b in zip(cached.logits, ref_logits))
        out[granularity] = (torch.equal(cached.sequences, ref_seq), diff)
    return out


@torch.inference_mode()
def per_token(model, ids: torch.Tensor, new: int, mode: str) -> float:
    cache = model.new_cache(granularity="prompt" if mode == "prompt" else "token")
    with model.disable_adapters() if mode == "base" else nullcontext():
        nxt = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        sync(ids.device)
        t0 = time.perf_counter()
        for _ in range(new):
            nxt = model(input_ids=nxt, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        sync(ids.device)
    return (time.perf_counter() - t0) / new


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ratios(base, dirs: list[Path], device: str, batches: list[int], reps: int, new: int) -> list[str]:
    dt = torch.bfloat16
    five = build(base, dirs, 5, device, dt)  # base (adapters disabled), token and prompt granularity
    models = {"base": five, "token": five, "prompt": five, "top2-E4": build(base, dirs, 4, device, dt, top_k=2),
              "top2-E64": build(base, dirs, 64, device, dt, top_k=2)}
    lines = []
    for b in batches:
        ids = torch.randint(0, base.config.vocab_size, (b, 32), generator=torch.Generator().manual_seed(b)).to(device)
        times: dict[str, list[float]] = {m: [] for m in models}
        names = list(models)
        for rep in range(reps + 1):
            for m in names[rep % len(names):] + names[: rep % len(names)]:
                t = per_token(models[m], ids, new, m if m in ("base", "prompt") else "token")
                if rep:
                    times[m].append(t)
        med = {m: statistics.median(v) for m, v in times.items()}
        lines.append(f"batch {b:>2}: base {med['base'] * 1e3:.2f} ms/token; token {med['token'] / med['base']:.2f}x base, "
                     f"prompt {med['prompt'] / med['base']:.2f}x base (target <= 1.10x); top-2 E=64 / E=4 "
                     f"{med['top2-E64'] / med['top2-E4']:.2f}x (target <= 1.10x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda when present, else exit 0 with a message")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the SmolLM2 shape")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            print(NO_GPU)
            return 0
        args.device = "cuda"
    sys.path.insert(0, str(Path(__file__).parent))
    from topk import write_experts

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}")
    base = base_model(args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_experts(base, Path(tmp), rank=8)  # leaves base untouched
        print(f"PEFT parity (float32, one-hot expert 0): max |dlogit| = {parity(base, dirs, args.device):.1e}")
        for granularity, (same, diff) in cached_generation(base, dirs, args.device).items():
            print(f"cached generation, {granularity} granularity: tokens equal {same}, max |dlogit| = {diff:.1e}")
        for line in ratios(base, dirs, args.device, args.batches, args.reps, args.new):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
