"""Decoding speed: base model vs X-LoRA (token and prompt granularity) vs PEFT's XLoraModel.

One run, same inputs: a Llama of hidden 512, 8 layers, vocabulary 8000; 4 experts of rank 16 on
all seven projections; 16-token prompt, greedy, fixed number of new tokens. Per-token times are
taken from a streamer's timestamps; "early" = tokens 1-64, "late" = the last 64 tokens.

    python benchmarks/generate.py                 # full run (batch 1 and 4, 256 new tokens)
    python benchmarks/generate.py --quick         # smoke run
    python benchmarks/generate.py --smollm2       # the real model: benchmarks/generate_smollm2.py
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_base(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                      max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def make_experts(base, root: Path, n: int, rank: int) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                            init_lora_weights=False))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        pm.save_pretrained(str(root / f"e{i}"))
        out[f"e{i}"] = str(root / f"e{i}")
    return out


class Clock:
    """A streamer that timestamps every generated step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:  # noqa: ANN001
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def per_token(self) -> list[float]:
        # stamps[0] is the prompt (before prefill); stamps[1] the first new token (after prefill)
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def timed_generate(model, ids, mask, new_tokens: int, **kwargs) -> tuple[list[float], float, torch.Tensor]:
    clock = Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock, **kwargs)
    return clock.per_token(), time.perf_counter() - t0, out


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def window_ms(times: list[float], lo: int, hi: int) -> float:
    """Median per-token time in ms over new tokens lo..hi (1-based, inclusive; token 1 follows the prefill)."""
    sel = times[max(lo - 2, 0):hi - 1]
    return 1000 * statistics.median(sel)


def main() -> int:
    if "--smollm2" in sys.argv:  # the real-model rows live in their own script
        from generate_smollm2 import main as smollm2_main

        return smollm2_main([a for a in sys.argv[1:] if a != "--smollm2"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--peft-tokens", type=int, default=128, help="PEFT recomputes everything; cap its length")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--json", type=str, default=None, help="write the summary as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.new_tokens, args.peft_tokens, args.batches = 128, 2, 1000, 32, 16, [1]
    torch.set_num_threads(os.cpu_count() or 1)

    import peft
    import transformers

    from xlora import XLoraConfig, XLoraModel

    print(f"# xlora generate benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"# Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.experts} experts r={args.rank};"
          f" prompt {args.prompt}, {args.new_tokens} new tokens (PEFT {args.peft_tokens}), greedy")

    summary: dict = {"args": vars(args), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.hidden, args.layers, args.vocab)
        experts = make_experts(base, Path(tmp), args.experts, args.rank)
        ours = XLoraModel(build_base(args.hidden, args.layers, args.vocab), XLoraConfig(experts=experts)).eval()
        peft_base = build_base(args.hidden, args.layers, args.vocab)
        peft_base.config.use_cache = False
        theirs = peft.get_peft_model(peft_base, peft.XLoraConfig(
            task_type="CAUSAL_LM", hidden_size=args.hidden, xlora_depth=1,
            adapters={str(i): p for i, p in enumerate(experts.values())})).eval()
        ours.head.layers.load_state_dict(theirs.base_model.internal_xlora_classifier.layers.state_dict())

        for b in args.batches:
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(3, args.vocab, (b, args.prompt), generator=g)
            mask = torch.ones_like(ids)
            n = args.new_tokens
            timed_generate(base, ids, mask, 4)  # warm-up
            timed_generate(ours, ids, mask, 4)
            runs = {
                "base": timed_generate(base, ids, mask, n),
                "xlora-token": timed_generate(ours, ids, mask, n),
                "xlora-prompt": timed_generate(ours, ids, mask, n, granularity="prompt"),
            }
            cache = ours.new_cache()
            with torch.inference_mode():
                ours(input_ids=ids, attention_mask=mask, cache=cache)
                base_out = base(input_ids=ids, attention_mask=mask, use_cache=True)
            kv = {"base": cache_bytes(base_out.cache), "xlora_main": cache_bytes(cache),
                  "xlora_scaling": cache_bytes(cache.scaling_cache)}
            pn = args.peft_tokens
            runs["peft"] = timed_generate(theirs, ids, mask, pn)
            # same tokens? (greedy; PEFT only for its shorter length)
            same = torch.equal(runs["xlora-token"][2][:, : args.prompt + pn], runs["peft"][2])
            ours_pn = sum(runs["xlora-token"][0][: pn - 1])
            peft_pn = sum(runs["peft"][0][: pn - 1])
            print(f"\n## batch {b}: per-token ms (median), early = tokens 1-64, late = tokens {n - 63}-{n}")
            print(f"{'model':<14}{'early ms':>10}{'late ms':>10}{'late/early':>12}{'/base early':>13}{'/base late':>12}")
            res = {}
            base_e, base_l = window_ms(runs["base"][0], 1, 64), window_ms(runs["base"][0], n - 63, n)
            for name, (times, total, _) in runs.items():
                last = pn if name == "peft" else n
                e, l = window_ms(times, 1, 64), window_ms(times, last - 63, last)
                res[name] = {"early_ms": e, "late_ms": l, "total_s": total}
                label = f"{name}" + (f" ({pn} tok)" if name == "peft" else "")
                print(f"{label:<14}{e:>10.2f}{l:>10.2f}{l / e:>12.2f}{e / base_e:>13.2f}{l / base_l:>12.2f}")
            print(f"PEFT / ours over the first {pn} tokens: {peft_pn / ours_pn:.1f}x "
                  f"(ours {ours_pn:.2f}s, PEFT {peft_pn:.2f}s); same greedy tokens: {same}")
            print(f"KV cache after the prompt: base {kv['base'] / 1e6:.2f} MB, ours main {kv['xlora_main'] / 1e6:.2f} MB"
                  f" + scaling {kv['xlora_scaling'] / 1e6:.2f} MB")
            res["peft_over_ours_first_tokens"] = peft_pn / ours_pn
            res["same_tokens_as_peft"] = same
            res["kv_bytes"] = kv
            summary["results"][f"batch{b}"] = res
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
