"""`xlora train` under `accelerate launch` with FSDP (examples/accelerate_fsdp.yaml): two CPU processes
on gloo, the frozen base and experts in shards, give the head of one process with the same global
batch, and a checkpoint (the head alone) resumes to the same head."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS, free_port, make_expert, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from xlora.train.config import TrainConfig
from xlora.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE = 6, 3
OPTS = {"max_length": 24, "learning_rate": 0.02, "max_steps": STEPS, "save_every": SAVE, "seed": 5,
        "head_dropout": 0.0, "head_depth": 2, "head_hidden_size": 16, "max_grad_norm": 1.0, "warmup_steps": 2}
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs accelerate launch (torch.distributed.run)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, two random PEFT experts (one on every projection, one on attention only), 64 texts."""
    root = tmp_path_factory.mktemp("fsdp")
    base = tiny_model("llama")
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "base"))
    experts = {"wide": make_expert(base, root / "wide", r=4, alpha=8, targets=LLAMA_TARGETS, seed=1),
               "attn": make_expert(base, root / "attn", r=2, alpha=4, targets=LLAMA_TARGETS[:4], seed=2)}
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghij0123456789 ") for _ in range(rng.randrange(8, 30))) for _ in range(64)]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"base": str(root / "base"), "experts": {k: str(v) for k, v in experts.items()},
            "train": str(root / "train.jsonl")}



def launch(world, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file examples/accelerate_fsdp.yaml -m xlora train`` (2 processes, per-device batch 4)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate_fsdp.yaml"), "--main_process_port", str(free_port()),
           "-m", "xlora", "train", "--base-model", world["base"], "--train-file", world["train"],
           "--output-dir", str(out), "--experts", *[f"{k}={v}" for k, v in world["experts"].items()],
           "--per-device-batch-size", "4", "--no-progress", *extra]
    for key, value in OPTS.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_LOG_LEVEL": "error"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def head(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "xlora_head.safetensors"))


def test_fsdp_on_two_processes_equals_one_process_and_resumes_exactly(world, tmp_path):
    single = tmp_path / "single"
    train(TrainConfig.from_dict({"base_model": world["base"], "train_file": world["train"], "output_dir": str(single),
                                 "experts": world["experts"], "per_device_batch_size": 8, "progress": False, **OPTS}))
    run = launch(world, tmp_path / "fsdp")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "2 process(es), global batch 8" in run.stdout
    want, got = head(single), head(tmp_path / "fsdp")
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)

    ckpt = tmp_path / "fsdp" / "checkpoints" / f"step-{SAVE:08d}"
    mine, ref = sorted(p.name for p in ckpt.iterdir()), sorted(p.name for p in (single / ckpt.relative_to(
        tmp_path / "fsdp")).iterdir())
    assert mine == ref  # the same files as one process: the head and the optimizer, no base or expert weights
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < 200_000
    for k, v in head(single / "checkpoints" / ckpt.name).items():
        torch.testing.assert_close(head(ckpt)[k], v, rtol=0, atol=1e-5)
    assert max(float((head(ckpt)[k] - want[k]).abs().max()) for k in want) > 1e-3  # the steps after it did move it

    # resume: drop everything after step SAVE, run again from that checkpoint, reach the same head
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / f"step-{STEPS:08d}")
    (tmp_path / "fsdp" / "xlora_head.safetensors").unlink()
    again = launch(world, tmp_path / "fsdp", "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    assert f"(step {SAVE})" in again.stdout
    for k in want:
        torch.testing.assert_close(head(tmp_path / "fsdp")[k], want[k], rtol=0, atol=1e-5)


def test_fsdp_shards_the_frozen_weights_and_keeps_the_head_whole(world, tmp_path):
    """In each process: base and expert weights are DTensors holding half the rows; the head is a plain tensor."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import json, sys
from torch.distributed.tensor import DTensor
from xlora.train.config import TrainConfig
from xlora.train.setup import setup
cfg = TrainConfig.from_dict({{"base_model": {world['base']!r}, "train_file": {world['train']!r},
                             "output_dir": sys.argv[1], "experts": {world['experts']!r}, "max_steps": 1}})
run = setup(cfg)
kinds = {{}}
for name, p in run.model.named_parameters():
    part = "head" if name.startswith("head.") else "expert" if "lora_" in name else "base"
    local = p.to_local().shape[0] if isinstance(p, DTensor) else None
    kinds.setdefault(part, set()).add((isinstance(p, DTensor), local == (p.shape[0] + 1) // 2 if local is not None else None))
with open(f"{{sys.argv[1]}}-rank{{run.accelerator.process_index}}.json", "w") as f:  # one file each: no interleaving
    json.dump({{"kinds": {{k: sorted(v) for k, v in kinds.items()}}, "sharded": run.sharded}}, f)
""")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate_fsdp.yaml"), "--main_process_port", str(free_port()), str(script),
           str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-6000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"out-rank{rank}.json").read_text())
        assert seen == {"kinds": {"base": [[True, True]], "expert": [[True, True]], "head": [[False, None]]},
                        "sharded": True}


def test_fsdp_trains_the_experts_too_when_asked(world, tmp_path):
    """use_trainable_adapters: the experts stay whole like the head, and are saved as one process saves them."""
    single = tmp_path / "single"
    train(TrainConfig.from_dict({"base_model": world["base"], "train_file": world["train"], "output_dir": str(single),
                                 "experts": world["experts"], "per_device_batch_size": 8, "progress": False,
                                 "use_trainable_adapters": True, **OPTS}))
    run = launch(world, tmp_path / "fsdp", "--use-trainable-adapters")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    files = sorted(p.relative_to(single) for p in single.rglob("*.safetensors") if "checkpoints" not in p.parts)
    assert len(files) == 3 and files == sorted(p.relative_to(tmp_path / "fsdp") for p in (tmp_path / "fsdp").rglob(
        "*.safetensors") if "checkpoints" not in p.parts)  # the head and both experts
    moved = 0.0
    for rel in files:
        want, got = load_file(str(single / rel)), load_file(str(tmp_path / "fsdp" / rel))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
        if "experts" in rel.parts:
            start = load_file(next(Path(world["experts"][rel.parts[1]]).glob("*.safetensors")).as_posix())
            moved = max(moved, max(float((want[k] - start[k]).abs().max()) for k in want if k in start))
    assert moved > 1e-4  # the experts were trained, not just copied


def test_the_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    fsdp, ddp = (load_config_from_file(str(ROOT / "examples" / f"accelerate_{k}.yaml")) for k in ("fsdp", "ddp"))
    assert (fsdp.distributed_type, fsdp.num_processes, fsdp.fsdp_config["fsdp_version"]) == (DistributedType.FSDP, 2, 2)
    assert (ddp.distributed_type, ddp.num_processes) == (DistributedType.MULTI_CPU, 2)
