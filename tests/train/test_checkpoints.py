"""Checkpoints survive a kill at any file operation: a valid name always means a complete checkpoint.

The kill is simulated by counting the file-system operations of a save (create, write, chmod,
fsync, rename, unlink, rmdir, mkdir): the ``at``-th one and every later one raise ``Killed`` (a
``BaseException``, so no ``except Exception`` cleanup runs — as with ``kill -9``, nothing happens after
the kill). A killed ``save_file`` leaves half a file, as a cut write would.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_expert, tiny_model

import xlora.files
from xlora import XLoraConfig, XLoraModel
from xlora.train.checkpoints import (
    CHECKPOINTS,
    clean_stale,
    list_checkpoints,
    load_checkpoint_state,
    newest_valid_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """The process died at this file operation."""


@contextmanager
def killed_at(at: int | None):
    """Count file operations (yields the list of their names); the ``at``-th and all later ones raise ``Killed``."""
    ops: list[str] = []
    dead = False

    def wrap(name, real, counts=lambda *a, **k: True):
        def op(*args, **kwargs):
            nonlocal dead
            if not counts(*args, **kwargs):
                return real(*args, **kwargs)
            if dead or len(ops) == at:
                dead = True
                if name == "save_file":  # a cut write: half of the file's bytes
                    real(*args, **kwargs)
                    path = Path(args[1])
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise Killed(f"killed at operation {at} ({name})")
            ops.append(name)
            return real(*args, **kwargs)
        return op

    targets = [(os, n) for n in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "chmod", "fsync")]
    saved = {(mod, n): getattr(mod, n) for mod, n in [*targets, (os, "open"), (xlora.files, "save_file")]}
    try:
        for mod, n in targets:
            setattr(mod, n, wrap(n, saved[mod, n]))
        os.open = wrap("create", saved[os, "open"], lambda path, flags, *a, **k: bool(flags & os.O_CREAT))
        xlora.files.save_file = wrap("save_file", saved[xlora.files, "save_file"])
        yield ops
    finally:
        for (mod, n), real in saved.items():
            setattr(mod, n, real)


@pytest.fixture(scope="module")
def model_and_optimizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = tiny_model("llama")
    expert = make_expert(base, root / "e1", r=2, alpha=4, targets=["q_proj", "v_proj"], seed=1)
    expert2 = make_expert(base, root / "e2", r=2, alpha=4, targets=["q_proj"], seed=2)
    model = XLoraModel(copy.deepcopy(base), XLoraConfig(experts={"e1": str(expert), "e2": str(expert2)}))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()  # so that it has state to save
    return base, model, optimizer


def tag(model, optimizer, value: float) -> None:
    """Make the head's weights and the optimizer's moments all equal ``value``: a checkpoint says which save it was."""
    with torch.no_grad():
        for p in model.head.parameters():
            p.fill_(value)
        for state in optimizer.state.values():
            state["exp_avg"].fill_(value)


def save(out: Path, step: int, value: float, model, optimizer, keep: int = 3) -> Path:
    tag(model, optimizer, value)
    return save_checkpoint(out, step, model, optimizer, {"train_loss": value}, keep)


def assert_consistent(out: Path, allowed: dict[int, set[float]], base) -> int:
    """Every checkpoint under a valid name is complete and holds one of the saves allowed for its step;
    the newest loads as a model. Returns the newest step."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged checkpoint under a valid name would warn
        newest = newest_valid_checkpoint(out)
    for path in list_checkpoints(out):
        step = int(path.name.split("-")[1])
        state, head, optim = load_checkpoint_state(path)
        assert state["step"] == step and step in allowed, (path, state["step"])
        values = {float(t.flatten()[0]) for t in head.values()}
        assert len(values) == 1 and values <= allowed[step], (path, values)
        assert {float(t.flatten()[0]) for k, t in optim.items() if k.endswith("exp_avg")} == values
    assert newest is not None
    model = XLoraModel.from_pretrained(newest[0], base_model=copy.deepcopy(base))
    assert {float(p.flatten()[0]) for p in model.head.parameters()} <= allowed[newest[1]["step"]]
    return newest[1]["step"]


# scenario: (step saved, its tag, allowed tags per step after a kill, allowed newest steps, final tags per step)
SCENARIOS = {
    "new step, prune the oldest": (4, 4.0, {1: {1.0}, 2: {2.0}, 3: {3.0}, 4: {4.0}}, {3, 4},
                                   {2: 2.0, 3: 3.0, 4: 4.0}),
    "a step saved again": (3, 33.0, {1: {1.0}, 2: {2.0}, 3: {3.0, 33.0}}, {2, 3}, {1: 1.0, 2: 2.0, 3: 33.0}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_file_operation_leaves_only_complete_checkpoints(model_and_optimizer, tmp_path, scenario):
    base, model, optimizer = model_and_optimizer
    step, value, allowed, newest_allowed, final = SCENARIOS[scenario]
    template = tmp_path / "template"
    for s in (1, 2, 3):
        save(template, s, float(s), model, optimizer)
    with killed_at(None) as ops:  # count the operations of an undisturbed save
        save(tmp_path / "count", 0, 0.0, model, optimizer)  # (a fresh directory: no prune)
        shutil.copytree(template, tmp_path / "dry")
        ops.clear()
        save(tmp_path / "dry", step, value, model, optimizer)
    n_ops = len(ops)
    assert n_ops >= 20 and {"rename", "unlink", "rmdir", "save_file", "replace"} <= set(ops), ops
    newest_seen = set()
    for at in range(n_ops + 1):
        out = tmp_path / f"kill-{at}"
        shutil.copytree(template, out)
        tag(model, optimizer, value)
        with killed_at(at), pytest.raises(Killed) if at < n_ops else _nothing():
            save_checkpoint(out, step, model, optimizer, {"train_loss": value}, 3)
        newest = assert_consistent(out, allowed, base)
        assert newest in newest_allowed, (at, newest)
        newest_seen.add(newest)
        # the next start removes the leftovers; saving again then gives the undisturbed result
        clean_stale(out)
        assert sorted(p.name for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".")) == []
        save(out, step, value, model, optimizer)
        got = {int(p.name.split("-")[1]): float(next(iter(load_checkpoint_state(p)[1].values())).flatten()[0])
               for p in list_checkpoints(out)}
        assert got == final, (at, got)
        shutil.rmtree(out)
    assert newest_seen == newest_allowed  # kills both before and after the new checkpoint took its name


@contextmanager
def _nothing():
    yield


def test_clean_stale_removes_only_leftovers_of_ours(tmp_path):
    out = tmp_path
    (out / CHECKPOINTS / ".tmp-step-00000004").mkdir(parents=True)
    (out / CHECKPOINTS / ".tmp-step-00000004" / "xlora_head.safetensors").write_bytes(b"half")
    (out / CHECKPOINTS / ".trash-step-00000001-77-0").mkdir()
    (out / CHECKPOINTS / "step-00000002").mkdir()
    (out / ".xlora_head.safetensors.k2j3h4.tmp").write_bytes(b"half")
    (out / ".xlora_config.json.abc.tmp").write_text("{")
    (out / "experts" / "chem").mkdir(parents=True)
    (out / "experts" / "chem" / ".adapter_model.safetensors.x1.tmp").write_bytes(b"")
    (out / ".notes.txt.tmp").write_text("the user's")  # not a temporary of ours
    (out / "data.tmp").write_text("the user's")
    removed = clean_stale(out)
    assert sorted(p.name for p in removed) == sorted([
        ".tmp-step-00000004", ".trash-step-00000001-77-0", ".xlora_head.safetensors.k2j3h4.tmp",
        ".xlora_config.json.abc.tmp", ".adapter_model.safetensors.x1.tmp"])
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == [".notes.txt.tmp", "checkpoints", "checkpoints/step-00000002", "data.tmp", "experts",
                    "experts/chem"]
