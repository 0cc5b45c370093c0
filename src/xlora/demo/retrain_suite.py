"""Retraining on the science suite's files: a data snapshot, seven experts, then the head; a stop loses nothing.

``python -m xlora.demo.retrain_suite OUT_DIR [data] [experts | expert:<d>,...] [head] [correct] --suite DATA_DIR
--rows ROWS``
runs the phases in order:

- ``data``: snapshot the science rows under ``ROWS`` (``*.jsonl`` run files or ``*.jsonl.gz``) into
  ``DATA_DIR/rows/`` and write the split files from the snapshot (:func:`xlora.demo.suite.write_splits`),
  unless ``DATA_DIR/manifest.json`` exists (so a rerun trains on the same files); ``data:refresh`` always
  does (e.g. before the mechanics expert, whose pulls grow slowest);
- ``experts`` (in :data:`ORDER`: mechanics last, as its pulls are the slowest data to grow) or
  ``expert:<d>,...``: one PEFT LoRA expert per domain on ``DATA_DIR/train/<d>.jsonl`` into
  ``OUT_DIR/experts/<d>``, checkpointed every 20 steps to ``OUT_DIR/experts/<d>.ckpt.safetensors``;
- ``head``: the X-LoRA head on ``DATA_DIR/head_train.jsonl`` (every domain's train split in its own draw, plus
  ``composite_train``), validated on ``DATA_DIR/validation.jsonl``, checkpointed every 25 steps in
  ``OUT_DIR/head_run``; by default the shipped head's recipe (:data:`SUITE_HEAD_STEPS` steps, the demo's
  :data:`~xlora.demo.retrain.HEAD_OPTIONS` with :data:`SUITE_HEAD_OPTIONS`);
- ``correct``: that head corrected by the records' routing labels at its own depth (``xlora distill`` with
  :data:`SUITE_CORRECT_OPTIONS`: routing cross-entropy on the labelled records' scored positions, KL to the
  head everywhere else; :data:`SUITE_CORRECT_STEPS` steps), written as a complete X-LoRA directory to
  ``OUT_DIR/corrected`` (the experts by relative path), checkpointed every 50 steps there (~19 min on 2 cores); a
  finished correction of the same head, experts, data and settings is kept when the phase runs again.

Rerunning the same command skips finished experts, continues a stopped one from its checkpoint (the same
weights as an uninterrupted run, unless its data file changed: then it restarts, said in the log) and
resumes the head. ``OUT_DIR/training.json`` keeps every expert's and the head's result and appends one
entry per phase run to ``runs``: start time, seconds, torch threads and the settings used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from xlora.demo import science_tasks, suite
from xlora.demo.base_model import base_model_dir
from xlora.demo.retrain import (
    EXPERT_BATCH,
    EXPERT_LR,
    EXPERT_RANK,
    EXPERT_TARGETS,
    HEAD_OPTIONS,
    HEAD_STEPS,
    finish_adapter,
    retrain,
    train_expert,
    train_head,
)
from xlora.files import atomic_write, atomic_write_text
from xlora.saving import CONFIG_FILE
from xlora.train.loop_checkpoint import stop_on_signals
from xlora.train.records import iter_records

ROW_FILES = ("molecules", "peptides")  # the run files of xlora.demo.sciencedata (and the packed assets)
ORDER = ("protein", "chemistry", "quantum", "mathematics", "general", "graph", "mechanics")
EXPERT_STEPS = 200  # two passes over 800 records in batches of 8
EXPERT_STEPS_BY_DOMAIN = {"graph": 100}  # long passages; the demo's graph expert was flat after 64 steps


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot_rows(rows: Path, dest: Path) -> dict[str, int]:
    """Copy the row files under ``rows`` (:data:`ROW_FILES`, as run files ``.jsonl`` or packed ``.jsonl.gz``;
    other files there, e.g. a discarded protocol's runs, are not rows) to ``dest/<name>.jsonl.gz`` (complete
    lines only, atomically); returns the line count per file."""
    counts = {}
    dest.mkdir(parents=True, exist_ok=True)
    paths = [p for name in ROW_FILES for p in (rows / f"{name}.jsonl", rows / f"{name}.jsonl.gz") if p.is_file()]
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
        good = []
        for ln in lines:  # a run file being appended to may end in a torn line
            try:
                json.loads(ln)
                good.append(ln)
            except json.JSONDecodeError:
                continue
        stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
        payload = gzip.compress(("\n".join(good) + "\n").encode(), mtime=0)
        atomic_write(dest / f"{stem}.jsonl.gz", lambda tmp, data=payload: Path(tmp).write_bytes(data))
        counts[f"{stem}.jsonl.gz"] = len(good)
    return counts


def write_data(data: Path, rows: Path | None) -> dict[str, Any]:
    """The ``data`` phase: snapshot the rows (if ``rows``), then write the split files from the snapshot."""
    counts = snapshot_rows(rows, data / "rows") if rows is not None else {}
    science_tasks.load_pools.cache_clear()  # the snapshot replaced files a cached read may have seen
    manifest = suite.write_splits(data, data_dir=str(data / "rows"))
    return {"rows": counts, "science_rows": manifest["science_rows"],
            "files": {k: v["records"] for k, v in manifest["files"].items()}}


def train_suite_expert(out: Path, data: Path, domain: str, steps: int | None, base_dir: Path | None,
                       done: dict[str, Any] | None) -> dict[str, Any]:
    """Train (or continue, or skip when finished) the expert of ``domain`` on ``data/train/<domain>.jsonl``."""
    target = out / "experts" / domain
    if done and done.get("finished") and (target / "adapter_model.safetensors").is_file():
        print(f"expert {domain!r}: finished earlier, skipped", flush=True)
        return done
    train_file = data / "train" / f"{domain}.jsonl"
    records, sha = list(iter_records(train_file)), _sha256(train_file)
    n = steps or EXPERT_STEPS_BY_DOMAIN.get(domain, EXPERT_STEPS)
    print(f"expert {domain!r}: {len(records)} records, {n} steps", flush=True)
    stats = train_expert(base_dir or base_model_dir(), records, target, steps=n, data_id=sha,
                         checkpoint=out / "experts" / f"{domain}.ckpt.safetensors")
    if stats["finished"]:
        finish_adapter(target, portable=base_dir is None)
    stats.update({"train_file": str(train_file), "sha256": sha, "records": len(records)})
    print(f"expert {domain!r}: {stats}", flush=True)
    return stats


SUITE_HEAD_STEPS = 400  # the shipped suite head's (H9 in BENCHMARKS)
SUITE_HEAD_OPTIONS: dict[str, Any] = {"routing_weight": 1.0, "routing_tokens": "scored", "eval_every": SUITE_HEAD_STEPS}


SUITE_CORRECT_STEPS = 1000
SUITE_CORRECT_OPTIONS: dict[str, Any] = {"routing_weight": 1.0, "positions": "unrouted", "weight_decay": 0.1,
                                         "learning_rate": 5e-4, "batch_size": 8, "max_length": 192}
CORRECTED = "corrected"  # OUT_DIR/corrected: the correct phase's model


def correct_head(out: Path, data: Path, base: Path | None, steps: int) -> dict[str, Any]:
    """The ``correct`` phase (see the module doc): ``out``'s head corrected into ``out/corrected``."""
    from xlora.train.distill import DistillConfig, distill
    from xlora.train.distill_config import REPORT_FILE, finished_report

    cfg = DistillConfig(teacher_dir=str(out), output_dir=str(out / CORRECTED), scaling_pass_layers=None,
                        train_file=str(data / "head_train.jsonl"), eval_file=str(data / "validation.jsonl"),
                        steps=steps, base_model=str(base or base_model_dir()), overwrite=True, log_every=50,
                        **SUITE_CORRECT_OPTIONS)
    report = finished_report(cfg)
    skipped = {"skipped": "finished before with this head, experts, data and settings"} if report else {}
    if report is None:
        distill(cfg)
        report = json.loads((out / CORRECTED / REPORT_FILE).read_text())
    return {"output_dir": cfg.output_dir, "steps": steps, "seconds": round(report["seconds"], 1),
            "initial": report["initial"], "final": report["final"], **skipped}


def _phase(phase: str) -> tuple[str, tuple[str, ...]]:
    if phase in ("data", "data:refresh", "head", "correct"):
        return phase, ()
    if phase == "experts":
        return "experts", ORDER
    names = tuple(n for n in phase.split(":", 1)[1].split(",") if n) if phase.startswith("expert:") else ()
    if not names:
        raise ValueError(f"unknown suite phase {phase!r}; use 'data', 'data:refresh', 'experts', "
                         f"'expert:<domain>[,...]', 'head' or 'correct'")
    unknown = [n for n in names if n not in suite.DOMAINS]
    if unknown:
        raise ValueError(f"suite phase {phase!r} names unknown domains {unknown}; choose from {list(suite.DOMAINS)}")
    return "experts", names


def retrain_suite(out_dir: str | os.PathLike, data_dir: str | os.PathLike,
                  phases: tuple[str, ...] = ("data", "experts", "head", "correct"), *,
                  rows: str | os.PathLike | None = None, expert_steps: int | None = None,
                  head_steps: int = SUITE_HEAD_STEPS, correct_steps: int = SUITE_CORRECT_STEPS,
                  head_options: dict[str, Any] | None = None, base_dir: str | os.PathLike | None = None
                  ) -> dict[str, Any]:
    """Run the phases (see the module doc) into ``out_dir``; returns and writes ``out_dir/training.json``.

    Raises:
        ValueError: a bad phase or domain (before anything runs), or ``data`` without ``rows`` and without
            the data folder's own ``rows/`` snapshot.
    """
    plan = [(p, *_phase(p)) for p in phases]
    head_options = {**SUITE_HEAD_OPTIONS, **(head_options or {})}
    out, data = Path(out_dir), Path(data_dir)
    if any(kind.startswith("data") for _, kind, _ in plan) and rows is None and not (data / "rows").is_dir():
        raise ValueError(f"the data phase needs rows=... (the science rows' folder); {data / 'rows'} does not exist")
    if any(kind == "correct" for _, kind, _ in plan) and "head" not in phases and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"the correct phase corrects the head phase's model, and {out / CONFIG_FILE} does not exist: "
                         "run the head phase first")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    base = Path(base_dir) if base_dir is not None else None
    for phase, kind, names in plan:
        started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
        settings: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
        if kind == "data" and (data / "manifest.json").is_file():  # written once: a rerun keeps its data
            result: Any = {"skipped": f"{data / 'manifest.json'} exists (data:refresh rewrites it)"}
        elif kind.startswith("data"):
            result = write_data(data, Path(rows) if rows is not None else None)
            settings.update({"rows": str(rows), "sizes": dict(suite.SIZES), "seed": suite.SEED})
        elif kind == "experts":
            result = {}
            settings.update({"rank": EXPERT_RANK, "alpha": 2 * EXPERT_RANK, "targets": EXPERT_TARGETS,
                             "batch_size": EXPERT_BATCH, "lr": EXPERT_LR,
                             "steps": {d: expert_steps or EXPERT_STEPS_BY_DOMAIN.get(d, EXPERT_STEPS) for d in names}})
            for d in names:
                prior = log.get("experts", {}).get(d)
                result[d] = log.setdefault("experts", {})[d] = train_suite_expert(out, data, d, expert_steps, base, prior)
                atomic_write_text(log_path, json.dumps(log, indent=2) + "\n")
        elif kind == "correct":
            result = log["corrected"] = correct_head(out, data, base, correct_steps)
            settings.update({"options": SUITE_CORRECT_OPTIONS, "steps": correct_steps})
        else:
            result = log["head"] = train_head(out, base, head_steps, out / "head_run", options=head_options,
                                              domain_names=suite.DOMAINS,
                                              files=(data / "head_train.jsonl", data / "validation.jsonl"))
            settings.update({"options": {**HEAD_OPTIONS, **head_options}, "steps": head_steps})
            shutil.copyfile(data / "manifest.json", out / "data_manifest.json")
        log.setdefault("runs", []).append({"phase": phase, "started": started,
                                           "seconds": round(time.perf_counter() - t0, 1), "settings": settings,
                                           "result": result})
        atomic_write_text(log_path, json.dumps(log, indent=2) + "\n")
    return log


def parse_head_options(pairs: list[str]) -> dict[str, Any]:
    """``["routing_weight=0.5", "layerwise_scalings=true"]`` -> ``{"routing_weight": 0.5, ...}`` (values as JSON,
    else as strings)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--head-option takes KEY=VALUE (e.g. routing_weight=0.5), got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> None:
    """``python -m xlora.demo.retrain_suite OUT_DIR [PHASE ...] [--suite DATA_DIR --rows DIR] [--threads N]``.

    Without ``--suite``: the five-domain demo assets (phases ``experts``, ``expert:<d>,...``, ``head``). With
    ``--suite``: the science suite (:mod:`xlora.demo.retrain_suite`; phases ``data``, ``experts``,
    ``expert:<d>,...``, ``head``, ``correct``), checkpointed so that a rerun of the same command continues where it stopped.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m xlora.demo.retrain_suite", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("phases", nargs="*")
    p.add_argument("--suite", default=None, help="the science suite's data folder (split files)")
    p.add_argument("--rows", default=None, help="folder of the science rows (*.jsonl[.gz]) the data phase snapshots")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--expert-steps", type=int, default=None)
    p.add_argument("--head-steps", type=int, default=None,
                   help=f"default: {SUITE_HEAD_STEPS} with --suite (the shipped suite head's), else {HEAD_STEPS}")
    p.add_argument("--correct-steps", type=int, default=SUITE_CORRECT_STEPS,
                   help=f"steps of the correct phase (default: {SUITE_CORRECT_STEPS}, the shipped suite head's)")
    p.add_argument("--head-option", action="append", default=[], metavar="KEY=JSON",
                   help="override a head option (any XLoraConfig/TrainConfig key), e.g. routing_weight=0.5; repeatable")
    a = p.parse_intermixed_args(argv if argv is not None else sys.argv[1:])  # phases may follow the options
    for flag, value in (("--head-steps", a.head_steps), ("--correct-steps", a.correct_steps)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if a.threads:
        torch.set_num_threads(a.threads)
    with stop_on_signals():  # kill / Ctrl-C: checkpoint after the current step, then exit
        if a.suite is None:
            retrain(a.out_dir, tuple(a.phases) or ("experts", "head"), expert_steps=a.expert_steps,
                    head_steps=HEAD_STEPS if a.head_steps is None else a.head_steps,
                    head_options=parse_head_options(a.head_option))
            return
        retrain_suite(a.out_dir, a.suite, tuple(a.phases) or ("data", "experts", "head", "correct"), rows=a.rows,
                      expert_steps=a.expert_steps,
                      head_steps=SUITE_HEAD_STEPS if a.head_steps is None else a.head_steps,
                      head_options=parse_head_options(a.head_option), correct_steps=a.correct_steps)


if __name__ == "__main__":
    main()
