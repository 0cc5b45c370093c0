"""Sparse top-k against the dense mixture: E in {4, 16, 64} rank-16 experts on a SmolLM2-shaped model.

Built in-process, nothing downloaded: a randomly initialised float32 Llama with SmolLM2-135M's shape
(hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied embeddings) and
rank-16 experts on all seven projections (210 adapted modules). Eight distinct PEFT experts are
written once; expert ``e`` reads directory ``e % 8`` (the timing depends on E and the ranks, not on
the values). The head has random weights and ``top_k = 2``.

Rows, per E: ``top-2`` (the sparse paths: the chosen experts sliced, gathered or grouped by expert) and
``dense`` (the same model with the sparse paths switched off, every expert computed and multiplied by its
0); prefill of a ``--prompt``-token prompt and per-token decoding (token granularity: both passes, with
the dual cache) at batch ``--batch`` (default 1; each row its own random prompt, so rows choose different
experts: the random head is the worst case for the experts a decoding step's rows share). Repetitions
are interleaved in a rotating order; medians, spread (max/min) and the ratios are printed side by side,
with an exactness check (max |logit difference| between top-2 and dense). ``--force-paths`` times
decoding with each sparse path forced instead (what set the thresholds).

    .venv/bin/python benchmarks/topk.py                 # ~3 min on 2 idle cores
    .venv/bin/python benchmarks/topk.py --reps 2 --new 4 --experts 4 64
    .venv/bin/python benchmarks/topk.py --batch 8 --new 8 --prompt 16
    .venv/bin/python benchmarks/topk.py --batch 8 --new 8 --prompt 16 --experts 64 --force-paths
    .venv/bin/python benchmarks/topk.py --module --reps 20     # one gate_proj alone, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

from xlora import XLoraConfig, XLoraModel  # noqa: E402
from xlora.layers import MixtureLoraLinear  # noqa: E402

DISTINCT = 8


def smollm2_shaped(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def write_experts(base: LlamaForCausalLM, root: Path, rank: int = 16) -> list[Path]:
    """``DISTINCT`` rank-``rank`` PEFT experts with random A and B on every projection."""
    from generate import make_experts

    return [Path(p) for p in make_experts(base, root, DISTINCT, rank).values()]


def build(E: int, dirs: list[Path], top_k: int | None = 2) -> XLoraModel:
    cfg = XLoraConfig(experts={f"x{e}": str(dirs[e % DISTINCT]) for e in range(E)}, top_k=top_k, head_depth=1)
    model = XLoraModel(smollm2_shaped(), cfg).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.05)
    return model


FORCED = {"dense": dict(SLICE_TOKENS=0, GATHER_SHARE=float("inf"), GROUP_SHARE=float("inf")),
          "sliced": dict(SLICE_TOKENS=1 << 30, UNION_SHARE=0, GATHER_SHARE=float("inf"), GROUP_SHARE=float("inf")),
          "gathered": dict(SLICE_TOKENS=0, GATHER_SHARE=0, GROUP_SHARE=float("inf"))}


@contextmanager
def forced(path: str):
    """Every pass through one path whatever the thresholds (``FORCED``): ``dense`` (every expert computed and
    multiplied by its 0) for the dense rows, each path in turn to set the thresholds."""
    saved = {k: getattr(MixtureLoraLinear, k) for k in ("SLICE_TOKENS", "UNION_SHARE", "GATHER_SHARE", "GROUP_SHARE")}
    for k, v in FORCED[path].items():
        setattr(MixtureLoraLinear, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(MixtureLoraLinear, k, v)


def forced_rows(models: dict[int, XLoraModel], ids: torch.Tensor, new: int, reps: int) -> None:
    """Decode ms/token per E with each path forced (the prompt too, where it applies), interleaved."""
    rows = [(E, path) for E in models for path in FORCED]
    times: dict[tuple[int, str], list[float]] = {r: [] for r in rows}
    for rep in range(reps + 1):  # rep 0 warms up
        for E, path in rows[rep % len(rows):] + rows[: rep % len(rows)]:
            with forced(path):
                decode = run(models[E], ids, new)[1]
            if rep:
                times[E, path].append(decode)
    print(f"\nbatch {ids.shape[0]}, each path forced, {reps} interleaved reps (medians, max/min)")
    for E, path in rows:
        t = times[E, path]
        print(f"{E:>3} {path:>9} {statistics.median(t) * 1e3:8.1f} ms/token  spread {max(t) / min(t):.2f}")


@torch.inference_mode()
def run(model: XLoraModel, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, seconds per decoded token, the last logits): greedy with the dual cache."""
    cache = model.new_cache()
    t0 = time.perf_counter()
    out = model(input_ids=ids, cache=cache, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new):
        out = model(input_ids=nxt, cache=cache, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - t0) / new, out.logits[:, -1]


def module_rows(experts: list[int], reps: int, calls: int = 200) -> None:
    """One SmolLM2 ``gate_proj`` (576 -> 1536) at batch 1, one token: the mixture layer alone, per call."""
    from torch import nn

    from xlora.adapters import LoraModuleWeights
    from xlora.layers import ScalingState

    torch.manual_seed(0)
    base = nn.Linear(576, 1536, bias=False).requires_grad_(False)
    x = torch.randn(1, 1, 576)
    layers, scalings = {}, {}
    for E in experts:
        state = ScalingState()
        w = {e: LoraModuleWeights(A=torch.randn(16, 576) * 0.02, B=torch.randn(1536, 16) * 0.02, scale=2.0, dropout=0.0)
             for e in range(E)}
        layers[E] = (MixtureLoraLinear(base, 0, E, w, state).eval(), state)
        s = torch.rand(1, 1, 1, E)
        scalings[E] = s * torch.zeros_like(s).scatter_(-1, s.topk(2, -1).indices, 1.0)
    rows = [(E, mode) for E in experts for mode in ("top-2", "dense", "base")]
    times: dict[tuple[int, str], list[float]] = {r: [] for r in rows}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for E, mode in rows[rep % len(rows):] + rows[: rep % len(rows)]:
                layer, state = layers[E]
                with state.use(scalings=scalings[E], top_k=2), forced("dense") if mode == "dense" else nullcontext():
                    call = base if mode == "base" else layer
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        call(x)
                    if rep:
                        times[E, mode].append((time.perf_counter() - t0) / calls)
    med = {r: statistics.median(v) for r, v in times.items()}
    print(f"\none gate_proj (576 -> 1536), batch 1, one token, {calls} calls x {reps} interleaved reps (medians)")
    for E, mode in rows:
        print(f"{E:>3} {mode:>6} {med[E, mode] * 1e6:8.1f} us/call  spread {max(times[E, mode]) / min(times[E, mode]):.2f}"
              f"  {med[E, mode] / med[E, 'base']:.2f}x the base layer")
    lo, hi = min(experts), max(experts)
    print(f"top-2 E={hi} / E={lo}: {med[hi, 'top-2'] / med[lo, 'top-2']:.2f}x per call; added over the base layer: "
          f"{(med[hi, 'top-2'] - med[hi, 'base']) * 1e6:.1f} vs {(med[lo, 'top-2'] - med[lo, 'base']) * 1e6:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--module", action="store_true", help="one module alone (seconds), not the whole model")
    ap.add_argument("--force-paths", action="store_true", help="decode with each sparse path forced (dense, sliced, "
                    "gathered) instead of the top-2/dense rows: what sets the thresholds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    if args.module:
        module_rows(args.experts, args.reps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_experts(smollm2_shaped(), Path(tmp))
        models = {E: build(E, dirs) for E in args.experts}
    ids = torch.randint(0, 49152, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    if args.force_paths:
        forced_rows(models, ids, args.new, args.reps)
        return
    rows = [(E, mode) for E in args.experts for mode in ("top-2", "dense")]
    times: dict[tuple[int, str], list[tuple[float, float]]] = {r: [] for r in rows}
    logits: dict[tuple[int, str], torch.Tensor] = {}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for E, mode in rows[rep % len(rows):] + rows[: rep % len(rows)]:
            with forced("dense") if mode == "dense" else nullcontext():
                prefill, decode, logits[E, mode] = run(models[E], ids, args.new)
            if rep:
                times[E, mode].append((prefill, decode))
    med = {r: [statistics.median(t[i] for t in times[r]) for i in (0, 1)] for r in rows}
    spread = {r: [max(t[i] for t in times[r]) / min(t[i] for t in times[r]) for i in (0, 1)] for r in rows}
    print(f"\nbatch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.reps} interleaved reps "
          "(medians, max/min)")
    print(f"{'E':>3} {'mode':>6} {'prefill ms':>11} {'spread':>6} {'decode ms/tok':>14} {'spread':>6}"
          f" {'top-2/dense decode':>19} {'max|dlogit|':>11}")
    for E, mode in rows:
        (p, d), (sp, sd) = med[E, mode], spread[E, mode]
        ratio = f"{d / med[E, 'dense'][1]:.2f}x" if mode == "top-2" else ""
        diff = (logits[E, mode] - logits[E, "dense"]).abs().max().item()
        print(f"{E:>3} {mode:>6} {p * 1e3:>11.1f} {sp:>6.2f} {d * 1e3:>14.1f} {sd:>6.2f} {ratio:>19} {diff:>11.1e}")
    lo, hi = min(args.experts), max(args.experts)
    print(f"\ndecode top-2: E={hi} / E={lo} = {med[hi, 'top-2'][1] / med[lo, 'top-2'][1]:.2f}x (target <= 1.10x); "
          f"prefill top-2: E={hi} / E={lo} = {med[hi, 'top-2'][0] / med[lo, 'top-2'][0]:.2f}x")


if __name__ == "__main__":
    main()
