"""Training checkpoints: complete under their name or not there at all, validated on resume, the last K kept.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding what
:meth:`XLoraModel.save_pretrained` writes, ``optimizer.safetensors`` and ``trainer_state.json``.
No pickle is ever written or read. What a kill (``kill -9``, power loss of the process) at any
point can leave behind, and why resume never sees it:

- a checkpoint is written under ``checkpoints/.tmp-step-N`` and renamed into place (one atomic
  ``rename``), so a ``step-N`` directory is always complete;
- a checkpoint is deleted (pruned, or replaced) by first renaming it to ``checkpoints/.trash-…``
  and only then deleting the files, so a half-deleted one never carries a valid name;
- leftovers (``.tmp-*``, ``.trash-*``, and the temporaries of atomic file writes) match no
  checkpoint name and are removed by :func:`clean_stale` when the next run starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from itertools import count
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from xlora import XLoraConfig
from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.saving import CONFIG_FILE, EXPERTS_DIR, HEAD_FILE
from xlora.train.config import RESUMABLE_CHANGES, TrainConfig, resume_conflicts

CHECKPOINTS = "checkpoints"
MARKER = "train_config.json"  # the run's options; marks the output directory as a run of ours
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP, _TRASH = ".tmp-", ".trash-"
_trash_ids = count()


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, sd["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(output_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N`` (temp dir + rename) and prune to the newest ``keep``; crash-safe at every step."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP}{final.name}"
    if tmp.exists():  # a killed attempt at this very step
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tensors, groups = optimizer_to_tensors(optimizer)
    atomic_save_safetensors(tmp / OPTIMIZER_FILE, tensors)
    atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "step": step, "param_groups": groups}, indent=2))
    if final.exists():  # saving a step again (resumed before a damaged checkpoint): drop the old one first
        discard(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        discard(old)
    return final


def discard(path: Path) -> None:
    """Delete a checkpoint directory: rename it out of the valid names (atomic), then delete its files."""
    trash = path.with_name(f"{_TRASH}{path.name}-{os.getpid()}-{next(_trash_ids)}")
    path.rename(trash)
    shutil.rmtree(trash)


def clean_stale(output_dir: Path) -> list[Path]:
    """Remove what a killed run left in ``output_dir`` (returned): ``checkpoints/.tmp-*`` and ``.trash-*``, and
    the temporaries of our atomic writes (``.<name>.<random>.tmp``) next to our files. Never touches other files."""
    out = Path(output_dir)
    found = [p for p in (out / CHECKPOINTS).glob(".*") if p.name.startswith((_TMP, _TRASH))]
    ours = (CONFIG_FILE, HEAD_FILE, MARKER, METRICS)
    found += [p for p in out.glob(".*.tmp") if p.name[1:].startswith(tuple(f"{n}." for n in ours))]
    found += [p for p in (out / EXPERTS_DIR).glob("*/.*.tmp") if p.is_file()]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def checkpoint_state(output_dir: Path, step: int) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``step`` (``step``, ``train_loss``, ``eval_loss``, ...)."""
    return json.loads((Path(output_dir) / CHECKPOINTS / f"step-{step:08d}" / STATE_FILE).read_text())


def load_checkpoint_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read and validate one checkpoint: ``(trainer_state, head_tensors, optimizer_tensors)``; raises if broken."""
    state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path / STATE_FILE} has no step")
    XLoraConfig.from_json_file(path / CONFIG_FILE)
    head = load_file(str(path / HEAD_FILE))
    optim = load_file(str(path / OPTIMIZER_FILE))
    for name, t in head.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"head tensor {name!r} is not finite")
    return state, head, optim


def newest_valid_checkpoint(output_dir: Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """The newest checkpoint that loads; broken ones are skipped with a warning naming them."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state, _, optim = load_checkpoint_state(path)
        except Exception as err:  # noqa: BLE001 - any damage means "skip this one"
            warnings.warn(f"skipping damaged checkpoint {path} ({type(err).__name__}: {err})", stacklevel=2)
            continue
        return path, state, optim
    return None


def resume_refusal(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` (with ``resume``) may not continue the run in its ``output_dir``, or ``None``: one line naming
    every option that differs from the run's ``train_config.json``, with both values. Only the schedule
    (:data:`~xlora.train.config.RESUMABLE_CHANGES`) may change; nothing is written either way."""
    marker = Path(cfg.output_dir) / MARKER
    if not cfg.resume or not marker.is_file():
        return None  # setup names the missing run
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"cannot resume {cfg.output_dir!r}: its {MARKER} is not valid JSON ({err}); start a new output_dir"
    diffs = resume_conflicts(saved if isinstance(saved, dict) else {}, cfg)
    if not diffs:
        return None
    return (f"cannot resume {cfg.output_dir!r} with other options than its run's ({MARKER}): " + "; ".join(diffs)
            + f". Only {', '.join(RESUMABLE_CHANGES)} may change on resume: pass the run's values again, or "
            "train into a new output_dir (or --overwrite)")
