"""Training checkpoints: written atomically, validated on resume, the last K kept.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding what
:meth:`XLoraModel.save_pretrained` writes, ``optimizer.safetensors`` and ``trainer_state.json``.
It is written under a temporary name and renamed into place, so a checkpoint that exists is complete.
No pickle is ever written or read.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from xlora._io import atomic_save_safetensors, atomic_write_text

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


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
    """Write ``checkpoints/step-N`` atomically (temp dir + rename) and prune to the newest ``keep``."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tensors, groups = optimizer_to_tensors(optimizer)
    atomic_save_safetensors(tmp / OPTIMIZER_FILE, tensors)
    atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "step": step, "param_groups": groups}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def load_checkpoint_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read and validate one checkpoint: ``(trainer_state, head_tensors, optimizer_tensors)``; raises if broken."""
    state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path / STATE_FILE} has no step")
    head = load_file(str(path / "xlora_head.safetensors"))
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
