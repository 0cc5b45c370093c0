"""One-file checkpoints of a small training loop — the demo's experts (:func:`xlora.demo.retrain.train_expert`)
and distillation (:mod:`xlora.train.distill`): one atomic safetensors file with the trained parameters, AdamW's
state and the loop's state (step, batch order, RNG, settings) as JSON metadata; and the stop request a signal
handler sets so the loop saves and exits at the end of a step (a checkpoint is never taken mid-step)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from xlora.files import atomic_save_safetensors
from xlora.train.checkpoints import optimizer_from_tensors, optimizer_to_tensors

STOP = threading.Event()  # set by SIGTERM/SIGINT in the command: training stops at the next step's end


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Ask a checkpointed training loop to save and exit after its current step (a signal handler)."""
    STOP.set()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGTERM / Ctrl-C ask a checkpointed loop to save after its current step and exit
    (:func:`request_stop`); a second one stops at once (``KeyboardInterrupt``: e.g. while loading, where no step
    ends). The previous handlers and a clear :data:`STOP` are restored on the way out. Outside the main thread
    (where Python cannot install handlers) it does nothing."""
    def on_signal(signum: int, frame: Any) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        request_stop()

    handled = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    before = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        STOP.clear()


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


def saved_state(path: Path) -> dict[str, Any] | None:
    """The loop state a checkpoint file was written with (step, settings, ...; None: no such file), tensors unread."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def rng_state(device: torch.device) -> dict[str, list[int]]:
    """The random generators dropout draws from (the CPU's, and the device's on CUDA), as lists for JSON."""
    state = {"rng": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8), device)


def open_metrics(path: Path, step: int) -> Any:
    """``path`` opened to append step ``step + 1`` on: only the first ``step`` complete lines are kept (later ones
    were written after the checkpoint; a kill may have cut the last one short)."""
    kept = []
    for line in path.read_text().splitlines(keepends=True) if step and path.is_file() else []:
        try:
            if line.endswith("\n") and json.loads(line)["step"] == len(kept) + 1 <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by run_steps)
    handle.writelines(kept)
    return handle
