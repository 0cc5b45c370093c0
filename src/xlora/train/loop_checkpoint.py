"""One-file checkpoints of a small training loop — the demo's experts (:func:`xlora.demo.retrain.train_expert`)
and distillation (:mod:`xlora.train.distill`): one atomic safetensors file with the trained parameters, AdamW's
state and the loop's state (step, batch order, RNG, settings) as JSON metadata; and the stop request a signal
handler sets so the loop saves and exits at the end of a step (a checkpoint is never taken mid-step)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

from xlora.files import atomic_save_safetensors
from xlora.train.checkpoints import optimizer_from_tensors, optimizer_to_tensors

STOP = threading.Event()  # set by SIGTERM/SIGINT in the command: training stops at the next step's end


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Ask a checkpointed training loop to save and exit after its current step (a signal handler)."""
    STOP.set()


def save_checkpoint(path: Path, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """One safetensors file (atomic): the parameters, AdamW's moments, and ``state`` (step, order, RNG, losses,
    settings) as JSON metadata, so a stop after it loses nothing."""
    tensors, groups = optimizer_to_tensors(opt)
    tensors = {f"opt.{k}": v for k, v in tensors.items()}
    tensors.update({f"param.{i}": p.detach().clone() for i, p in enumerate(params)})
    atomic_save_safetensors(path, tensors, metadata={"state": json.dumps({**state, "groups": groups})})


def load_checkpoint(path: Path, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                    settings: dict[str, Any]) -> dict[str, Any] | None:
    """Restore a checkpoint written with the same ``settings`` (else ``None``: start afresh, said)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        state = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    if state["settings"] != settings:
        print(f"  checkpoint {path} was written with other settings; starting afresh", flush=True)
        return None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    optimizer_from_tensors(opt, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, state["groups"])
    return state
