"""Decoding on a real model: SmolLM2-135M-Instruct (30 layers, 180 adapted modules) with the demo's
five rank-8 experts and head. Run through ``benchmarks/generate.py --smollm2`` or directly.

Rows, side by side in one run with interleaved repetitions (rotating order), medians and spread:

- per-token decode time, batch 1 and batch 8, 16-token prompt, ``--new`` greedy tokens: the base
  model (``disable_adapters()``: exactly the base), ours at token and prompt granularity, ours with
  a cheaper scaling pass (``scaling_pass_layers`` = N/4, N/2; speed only — those heads are trained
  by ``benchmarks/scaling_pass_layers.py``), PEFT's ``XLoraModel`` at batch 1 (``--peft-new`` tokens);
- prefill of a 512-token prompt (time to first token), base vs ours;
- the per-module overhead of the mixture layer at batch 1 (180 modules called directly, base
  layer alone vs mixture layer), and an exactness check: cached greedy tokens equal a full
  recomputation.

    .venv/bin/python benchmarks/generate.py --smollm2            # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/generate.py --smollm2 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def load(k: int | None = None):
    """The demo model; with ``k``, the same experts and head weights over a ``k``-layer scaling pass."""
    from xlora import XLoraConfig, XLoraModel
    from xlora.demo.base_model import load_base
    from xlora.demo.run import ASSETS
    from xlora.saving import CONFIG_FILE, HEAD_FILE, read_head_state

    base, tok = load_base(None)
    cfg = XLoraConfig.from_json_file(ASSETS / CONFIG_FILE)
    cfg.scaling_pass_layers = k
    model = XLoraModel(base, cfg, experts_root=ASSETS)
    model.head.load_state_dict(read_head_state(ASSETS / HEAD_FILE, model.head.state_dict()))
    return model.eval(), tok


def peft_model(ours):
    import peft

    from xlora.demo.base_model import load_base

    base, _ = load_base(None)
    base.config.use_cache = False  # PEFT's XLoraModel refuses use_cache=True
    cfg = ours.xlora_config
    pc = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=cfg.hidden_size,
                          adapters={str(i): str(e.path) for i, e in enumerate(ours.experts)},
                          xlora_depth=cfg.head_depth, xlora_size=cfg.head_hidden_size,
                          layerwise_scalings=cfg.layerwise_scalings)
    theirs = peft.get_peft_model(base, pc).eval()
    theirs.base_model.internal_xlora_classifier.layers.load_state_dict(ours.head.layers.state_dict())
    return theirs


def per_token_ms(run, new: int) -> float:
    """Per-token decode time (ms) from a streamer's timestamps, the first (prefill) step excluded."""
    stamps: list[float] = []

    class Clock:
        def put(self, value):  # noqa: ANN001
            stamps.append(time.perf_counter())

        def end(self):
            pass

    run(Clock())
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return 1000 * statistics.median(steps)


def decode_rows(models: dict, tok, batch: int, new: int, repeats: int) -> dict[str, list[float]]:
    prompts = [f"Question {i}: what is the molecular weight of the peptide ACDEFGHIK?" for i in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    enc = {k: v[:, -16:] for k, v in enc.items()}  # a 16-token prompt
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, kwargs, n = models[name]

            def run(clock, model=model, kwargs=kwargs, n=n or new):
                with torch.inference_mode():
                    model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                   streamer=clock, **kwargs)
            times[name].append(per_token_ms(run, n or new))
    return times


def prefill_rows(base, ours, repeats: int, cheap: dict | None = None) -> dict[str, list[float]]:
    """Time to first token for a 512-token prompt, and ours taken apart: the scaling pass alone (the
    base without its LM head) and the main pass alone (the scalings given: experts applied, no head)."""
    ids = torch.randint(100, 20000, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        s = ours.compute_scalings(input_ids=ids)
    runs = {"base": lambda: base(input_ids=ids, use_cache=True, logits_to_keep=1),
            "ours": lambda: ours(input_ids=ids, use_cache=True, logits_to_keep=1),
            "  scaling pass alone": lambda: ours.scaling_pass(input_ids=ids),
            "  main pass alone": lambda: ours(input_ids=ids, use_cache=True, logits_to_keep=1, scalings=s)}
    for k, m in (cheap or {}).items():  # a cheaper scaling pass: k of the layers
        runs[f"ours k={k}"] = lambda m=m: m(input_ids=ids, use_cache=True, logits_to_keep=1)
    out: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    with torch.inference_mode():
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                runs[name]()
                out[name].append(1000 * (time.perf_counter() - t0))
    return out


def step_parts(base, ours, repeats: int) -> dict[str, list[float]]:
    """One token-granularity decode step at batch 1 (48-token context) taken apart: the base, the base's
    decoder alone (no LM head), our scaling pass alone, and our whole step (scaling pass, head, main pass)."""
    from transformers import DynamicCache

    ids = torch.randint(100, 20000, (1, 48), generator=torch.Generator().manual_seed(0))
    nxt, pos = torch.tensor([[1234]]), torch.tensor([[48]])
    out: dict[str, list[float]] = {"base": [], "base decoder alone": [], "our scaling pass": [], "our step": []}
    parts = [base, base.model, ours.scaling_pass, ours]  # each called as part(input_ids=..., cache=..., ...)
    with torch.inference_mode():
        for _ in range(repeats):
            caches = [DynamicCache(config=base.config) for _ in range(3)] + [ours.new_cache()]
            for part, cache in zip(parts, caches):
                part(input_ids=ids, cache=cache, use_cache=True)
            for name, part, cache in zip(out, parts, caches):
                t0 = time.perf_counter()
                part(input_ids=nxt, cache=cache, use_cache=True, position_ids=pos)
                out[name].append(1000 * (time.perf_counter() - t0))
    return out


def module_overhead(ours, repeats: int) -> tuple[float, float]:
    """Per-module time (µs) of the base layers alone vs the mixture layers, batch 1, one token."""
    layers = ours.mixture_layers()
    s = torch.softmax(torch.randn(1, 1, ours.num_layers, ours.num_experts), -1)
    xs = {layer.in_features: torch.randn(1, 1, layer.in_features) for layer in layers}
    res = {"base": [], "mixture": []}
    with torch.inference_mode(), ours.state.use(scalings=s, coefficients=ours.columns.coefficients(s, 1.0)):
        for _ in range(repeats):
            for name, fn in (("base", lambda m: m.base_layer), ("mixture", lambda m: m)):
                t0 = time.perf_counter()
                for _ in range(10):
                    for layer in layers:
                        fn(layer)(xs[layer.in_features])
                res[name].append((time.perf_counter() - t0) / (10 * len(layers)) * 1e6)
    return statistics.median(res["base"]), statistics.median(res["mixture"])


def exact(ours, tok) -> bool:
    enc = tok(["The isoelectric point of MKTAYIAK is"], return_tensors="pt")
    with torch.inference_mode():
        cached = ours.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0)
        full = ours.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    return bool(torch.equal(cached, full))


def summary(name: str, xs: list[float], ref: float) -> str:
    med = statistics.median(xs)
    return f"{name:<22}{med:>10.2f}{med / ref:>9.2f}{max(xs) / min(xs):>9.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--peft-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts-only", action="store_true", help="only the prefill, step and per-module rows")
    args = ap.parse_args(argv)
    if args.quick:
        args.new, args.peft_new, args.repeats, args.batches = 16, 8, 2, [1]
    torch.set_num_threads(args.threads)
    from xlora.demo.base_model import load_base

    ours, tok = load()
    base = load_base(None)[0]
    n_layers = ours.base_model.config.num_hidden_layers
    print(f"# SmolLM2-135M-Instruct + 5 demo experts; {platform.platform()}, {os.cpu_count()} cpus, threads "
          f"{args.threads}, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"# exact: cached greedy tokens equal full recomputation: {exact(ours, tok)}")
    cheap = {k: load(k)[0] for k in (n_layers // 4, n_layers // 2)}
    result: dict = {}
    for b in ([] if args.parts_only else args.batches):
        models = {"base": (base, {}, None), "ours token": (ours, {}, None),
                  "ours prompt": (ours, {"granularity": "prompt"}, None)}
        models.update({f"ours k={k}": (m, {}, None) for k, m in cheap.items()})
        if b == 1:
            models["PEFT XLoraModel"] = (peft_model(ours), {}, args.peft_new)
        times = decode_rows(models, tok, b, args.new, args.repeats)
        ref = statistics.median(times["base"])
        print(f"\n## batch {b}: per-token ms, median of {args.repeats} ({args.new} new tokens; PEFT {args.peft_new})")
        print(f"{'model':<22}{'ms/token':>10}{'x base':>9}{'spread':>9}")
        for name, xs in times.items():
            print(summary(name, xs, ref))
        result[f"batch{b}"] = {n: statistics.median(x) for n, x in times.items()}
    pre = prefill_rows(base, ours, args.repeats, cheap)
    ref = statistics.median(pre["base"])
    print(f"\n## prefill, 512-token prompt (time to first token), median of {args.repeats}")
    print(f"{'model':<22}{'ms':>10}{'x base':>9}{'spread':>9}")
    for name, xs in pre.items():
        print(summary(name, xs, ref))
    parts = step_parts(base, ours, 3 * args.repeats)
    ref = statistics.median(parts["base"])
    print(f"\n## one token-granularity decode step at batch 1, taken apart, median of {3 * args.repeats}")
    print(f"{'part':<22}{'ms':>10}{'x base':>9}{'spread':>9}")
    for name, xs in parts.items():
        print(summary(name, xs, ref))
    result["step_parts"] = {n: statistics.median(x) for n, x in parts.items()}
    base_us, mix_us = module_overhead(ours, args.repeats)
    n_mod = len(ours.mixture_layers())
    print(f"\n## per module, batch 1: base layer {base_us:.1f} us, mixture layer {mix_us:.1f} us "
          f"(+{mix_us - base_us:.1f} us x {n_mod} modules = +{(mix_us - base_us) * n_mod / 1000:.2f} ms per pass)")
    expert_mb = sum(t.numel() * t.element_size() for m in ours.mixture_layers() for t in (m.lora_A, m.lora_B)) / 2**20
    base_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    print(f"# bytes read per decode step: base weights {base_mb:.0f} MiB, the experts' A and B {expert_mb:.1f} MiB "
          f"({expert_mb / base_mb:.1%} of the base: the memory floor of prompt granularity at batch 1)")
    result["prefill"] = {n: statistics.median(x) for n, x in pre.items()}
    result["module_us"] = {"base": base_us, "mixture": mix_us}
    print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
