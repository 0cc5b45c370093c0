"""Shallow scaling passes on the science suite: distilled and LM-trained heads over ``k`` layers against the full head.

For each ``k`` (default 4, 8, 15 of SmolLM2's 30 layers), over the shipped suite experts
(``xlora/demo/assets/suite``, whose head is the teacher and the ``k = 30`` row):

- ``distill-k<k>``: :func:`xlora.train.distill.distill` of the shipped head (KL over the experts, the
  teacher's weights as the start, ``--distill-steps`` AdamW steps of 8 records of ``--distill-data``
  (default ``train.jsonl`` and ``composite_train.jsonl``: every expert's training records and the head's
  composite ones; only their text is used),
  KL and top-1 agreement measured on ``validation.jsonl``);
- ``lm-k<k>``: a head trained from scratch on the LM loss with ``scaling_pass_layers = k``, the shipped
  head's own recipe (``python -m xlora.demo.retrain_suite OUT head --suite DATA --head-option
  scaling_pass_layers=k``);
- quality on ``--splits`` (default ``validation`` and ``test_unseen``): X-LoRA's mixed completion loss and
  top-1 own-expert routing per domain, :func:`xlora.demo.suite_eval.evaluate_split` (row ``xlora`` only);
- speed: per-token time at batch 1, token granularity (16-token prompt, ``--new`` greedy tokens, dual
  cache), relative to the base model; base, the full head and each distilled head interleaved in one loop,
  medians of ``--repeats`` (an LM-trained head of the same ``k`` runs the same code as the distilled one).

Every phase writes its own folder under ``--work`` and is skipped when that folder is complete, so a
stopped run continues where it stopped. Suite data: ``python -m xlora.demo.retrain_suite OUT data --suite
DATA --rows src/xlora/demo/assets/science`` (7 s; the files equal the shipped ``data_manifest.json``).

    .venv/bin/python -u benchmarks/shallow_heads.py --data DATA --work WORK        # ~1.5 h on 2 idle cores
    .venv/bin/python -u benchmarks/shallow_heads.py --data DATA --work W --ks 2 --distill-steps 4 --lm-steps 2 \\
        --splits validation --max-records 14 --new 4 --repeats 1                 # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
N_LAYERS = 30  # SmolLM2-135M


def teacher_dir() -> Path:
    from xlora.demo.run import ASSETS

    return ASSETS / "suite"


def distilled(k: int, data: Path, work: Path, steps: int, train_files: list[str], positions: str = "all") -> Path:
    from xlora.demo.base_model import base_model_dir
    from xlora.train.distill import REPORT_FILE, DistillConfig, distill

    out = work / f"distill-k{k}"
    if not (out / REPORT_FILE).is_file():
        train_file = work / "distill_data.jsonl"  # the files named, concatenated
        train_file.write_text("".join((data / f).read_text() for f in train_files))
        distill(DistillConfig(teacher_dir=str(teacher_dir()), output_dir=str(out), scaling_pass_layers=k,
                              train_file=str(train_file), eval_file=str(data / "validation.jsonl"),
                              steps=steps, batch_size=8, learning_rate=1e-3, warmup_steps=10, overwrite=True,
                              log_every=25, base_model=str(base_model_dir()), positions=positions))
    report = json.loads((out / REPORT_FILE).read_text())
    print(f"# distill k={k}: {report['seconds']:.0f} s, validation KL {report['initial']['kl']:.4f} -> "
          f"{report['final']['kl']:.4f}, top-1 agreement {report['initial']['top1']:.3f} -> "
          f"{report['final']['top1']:.3f}", flush=True)
    return out


def lm_trained(k: int, data: Path, work: Path, steps: int) -> Path:
    """The shipped head's recipe with ``scaling_pass_layers = k``, run as its own (resumable) process."""
    out = work / f"lm-k{k}"
    if not (out / "xlora_head.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "experts").exists():
            (out / "experts").symlink_to((teacher_dir() / "experts").resolve())
        subprocess.run([sys.executable, "-m", "xlora.demo.retrain_suite", str(out), "head", "--suite", str(data),
                        "--head-steps", str(steps), "--head-option", f"scaling_pass_layers={k}"], check=True)
    head = json.loads((out / "training.json").read_text())["head"]
    print(f"# lm k={k}: {head['seconds']:.0f} s, validation loss {head['eval_loss']:.4f}", flush=True)
    return out


def quality(name: str, model_dir: Path, data: Path, work: Path, splits: list[str], max_records: int | None) -> dict:
    """``{split: {"loss": mixed, "top1": {domain: share}}}`` from :func:`xlora.demo.suite_eval.evaluate_split`."""
    from xlora.demo.suite_eval import evaluate_split

    result = {}
    for split in splits:
        out = work / ("eval" if not max_records else f"eval-first{max_records}") / name
        path = out / split / "eval.json"
        if not path.is_file():
            src = data
            if max_records:  # the first records of the split (interleaved by domain)
                src = work / f"data-{max_records}"
                src.mkdir(parents=True, exist_ok=True)
                lines = (data / f"{split}.jsonl").read_text().splitlines()[:max_records]
                (src / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            evaluate_split(model_dir, src, split, out, generate=0, arrow=False, rows=["xlora"])
        report = json.loads(path.read_text())
        result[split] = {"loss": report["configs"]["xlora"]["loss"]["mixed"], "top1": report["routing"]["top1_own"]}
    return result


def speed(runs: dict[str, Path], new: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per-token ms relative to the base (median and spread max/min of the repeats), interleaved."""
    from generate_smollm2 import per_token_ms

    from xlora import XLoraModel
    from xlora.demo.base_model import load_base

    base, tok = load_base(None)
    models = {"base": base} | {n: XLoraModel.from_pretrained(r, base_model=load_base(None)[0]).eval()
                               for n, r in runs.items()}
    enc = tok(["Question: what is the HOMO-LUMO gap of the molecule CCO in eV? Answer briefly."], return_tensors="pt")
    enc = {key: v[:, -16:] for key, v in enc.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(repeats + 1):  # repeat 0 warms up
        for name in names[r % len(names):] + names[: r % len(names)]:
            def run(clock, m=models[name]):
                with torch.inference_mode():
                    m.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                               streamer=clock)
            ms = per_token_ms(run, new)
            if r:
                times[name].append(ms)
    ref = statistics.median(times["base"])
    return {n: {"ms": statistics.median(t), "x_base": statistics.median(t) / ref, "spread": max(t) / min(t)}
            for n, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the suite's split files (retrain_suite's data phase)")
    ap.add_argument("--work", required=True, help="heads and evaluations go here (reused when present)")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-data", nargs="+", default=["train.jsonl", "composite_train.jsonl"],
                    help="files of DATA the student learns the teacher's scalings on (labels unused): every "
                         "domain's expert training records and the composite ones, more varied than head_train.jsonl")
    ap.add_argument("--lm-steps", type=int, default=100, help="the shipped head's: 100")
    ap.add_argument("--no-lm", action="store_true", help="distilled heads only")
    ap.add_argument("--lm-ks", type=int, nargs="+", default=None, help="the k that also get an LM-trained head "
                    "(default: every k)")
    ap.add_argument("--positions", choices=["all", "scored"], default="all",
                    help="the tokens the distillation averages (DistillConfig.positions)")
    ap.add_argument("--splits", nargs="+", default=["validation", "test_unseen"])
    ap.add_argument("--max-records", type=int, default=None, help="only the first N records of each split")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# shallow heads on the science suite, SmolLM2-135M ({N_LAYERS} layers), {os.cpu_count()} cpus, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    runs = {f"full k={N_LAYERS}": teacher_dir()}
    for k in args.ks:
        runs[f"distilled k={k}"] = distilled(k, data, work, args.distill_steps, args.distill_data, args.positions)
        if not args.no_lm and k in (args.lm_ks or args.ks):
            runs[f"lm k={k}"] = lm_trained(k, data, work, args.lm_steps)
    rows = {n: quality(n.replace(" ", "_").replace("=", ""), r, data, work, args.splits, args.max_records)
            for n, r in runs.items()}
    fast = {} if args.no_speed else speed({n: r for n, r in runs.items() if not n.startswith("lm")}, args.new,
                                          args.repeats)
    for split in args.splits:
        print(f"\n{split}:\n| head | x base per token (spread) | mixed loss | top-1 own-expert routing |\n|---|---:|---:|---|")
        for n, row in rows.items():
            s = fast.get(n if not n.startswith("lm") else n.replace("lm", "distilled"))
            t = f"{s['x_base']:.2f} ({s['spread']:.2f})" if s else "-"
            top = ", ".join(f"{d[:4]} {v:.2f}" for d, v in row[split]["top1"].items())
            print(f"| {n} | {t} | {row[split]['loss']:.4f} | {top} |")
    if fast:
        print(f"\nbase: {fast['base']['ms']:.1f} ms/token (spread {fast['base']['spread']:.2f})")
    print("JSON " + json.dumps({"args": vars(args), "rows": rows, "speed": fast}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
