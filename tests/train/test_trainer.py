"""Training the head: it learns to route, resumes exactly, scales to two processes, refuses bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from xlora import XLoraModel
from xlora.train.config import TrainConfig
from xlora.train.trainer import TrainingError, lr_factor, scalings_regularizer, train

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


def domain_text(alphabet: str, rng: random.Random, length: int = 24) -> str:
    """A cyclic run through ``alphabet`` from a random start, with a random stride of 1 or 2."""
    start, stride = rng.randrange(len(alphabet)), rng.choice([1, 2])
    return "".join(alphabet[(start + i * stride) % len(alphabet)] for i in range(length))


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def train_expert(base, tok, texts: list[str], out: Path, steps: int = 120, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    enc = tok(texts, return_tensors="pt")
    for _step in range(steps):
        idx = torch.randint(0, len(texts), (16,))
        loss = model(input_ids=enc["input_ids"][idx], labels=enc["input_ids"][idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, a 'letters' and a 'digits' expert trained with PEFT, and mixed data files."""
    root = tmp_path_factory.mktemp("routing")
    base, tok = tiny_model("llama"), tiny_tokenizer()
    base.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    rng = random.Random(0)
    data = {name: [domain_text(alpha, rng) for _ in range(160)] for name, alpha in
            (("letters", LETTERS), ("digits", DIGITS))}
    experts = {name: str(train_expert(base, tok, texts[:100], root / name, seed=i))
               for i, (name, texts) in enumerate(data.items())}
    train_texts = data["letters"][:100] + data["digits"][:100]
    random.Random(1).shuffle(train_texts)
    files = {
        "train": write_jsonl(root / "train.jsonl", train_texts),
        "eval": write_jsonl(root / "eval.jsonl", data["letters"][100:130] + data["digits"][100:130]),
        "letters": data["letters"][130:], "digits": data["digits"][130:],
    }
    return {"root": root, "base": str(root / "base"), "experts": experts, "files": files, "tok": tok}


def config(world, out: Path, **kw) -> TrainConfig:
    opts = dict(base_model=world["base"], train_file=str(world["files"]["train"]), output_dir=str(out),
                experts=world["experts"], max_length=32, per_device_batch_size=8, learning_rate=2e-2,
                max_steps=40, save_every=10, log_every=5, progress=False, head_dropout=0.0, seed=3)
    opts.update(kw)
    return TrainConfig.from_dict(opts)


def mixed_loss(model: XLoraModel, tok, texts: list[str], **kw) -> float:
    enc = tok(texts, return_tensors="pt")
    with torch.no_grad():
        return float(model(input_ids=enc["input_ids"], labels=enc["input_ids"], **kw).loss)


@pytest.mark.parametrize("prefix_mean", [False, True], ids=["state", "state+mean"])
def test_head_learns_to_route(world, tmp_path, prefix_mean):
    """Also with ``head_prefix_mean`` (the head reads the running mean of the states too), saved and reloaded."""
    result = train(config(world, tmp_path / "run", eval_file=str(world["files"]["eval"]), max_steps=60,
                          head_prefix_mean=prefix_mean))
    assert result.steps == 60 and result.eval_loss is not None
    model = XLoraModel.from_pretrained(tmp_path / "run").eval()
    assert model.xlora_config.head_prefix_mean is prefix_mean
    tok = world["tok"]
    held_out = world["files"]["letters"] + world["files"]["digits"]
    ours = mixed_loss(model, tok, held_out)
    singles = {name: mixed_loss(model, tok, held_out, scalings=name) for name in world["experts"]}
    uniform = mixed_loss(model, tok, held_out, scalings="uniform")
    assert ours < min(singles.values()), (ours, singles)
    assert ours < uniform, (ours, uniform)
    for idx, name in enumerate(world["experts"]):
        enc = tok(world["files"][name], return_tensors="pt")
        with torch.no_grad():
            s = model(input_ids=enc["input_ids"]).scalings  # [b, t, L, E]
        share = s.mean(dim=(0, 1, 2))
        assert share[idx] > 0.6, (name, share.tolist())
    # metrics were logged: train loss decreased, eval loss recorded
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[0])
    assert any("eval_loss" in r for r in records)
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def head_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "xlora_head.safetensors"))


def test_resume_after_sigterm_equals_uninterrupted(world, tmp_path):
    full = tmp_path / "full"
    train(config(world, full, max_steps=30, save_every=2, head_depth=2, head_hidden_size=16, head_dropout=0.3))
    cmd = [sys.executable, "-m", "xlora", "train", "--base-model", world["base"],
           "--train-file", str(world["files"]["train"]), "--output-dir", str(tmp_path / "cut"),
           "--experts", *[f"{k}={v}" for k, v in world["experts"].items()], "--max-length", "32",
           "--per-device-batch-size", "8", "--learning-rate", "0.02", "--max-steps", "30", "--save-every", "2",
           "--seed", "3", "--head-depth", "2", "--head-hidden-size", "16", "--head-dropout", "0.3",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-00000004").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "continue with --resume" in out
    stopped_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 4 <= stopped_at < 30
    assert not (tmp_path / "cut" / "xlora_head.safetensors").exists()  # no final model from a cut run
    resumed = train(config(world, tmp_path / "cut", max_steps=30, save_every=2, head_depth=2,
                           head_hidden_size=16, head_dropout=0.3, resume=True))
    assert resumed.steps == 30
    a, b = head_of(full), head_of(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_corrupted_newest_checkpoint_is_skipped(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=20, save_every=5, keep_checkpoints=2))
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000015", "step-00000020"]  # only the last 2 are kept
    (ckpts[-1] / "xlora_head.safetensors").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step-00000020"):
        result = train(config(world, out, max_steps=25, save_every=5, keep_checkpoints=2, resume=True))
    assert result.steps == 25
    state = json.loads((out / "checkpoints" / "step-00000025" / "trainer_state.json").read_text())
    assert state["step"] == 25


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs torchrun")
def test_two_processes_equal_one_with_the_same_global_batch(world, tmp_path):
    single = tmp_path / "single"
    train(config(world, single, max_steps=6, per_device_batch_size=8, save_every=100))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "xlora", "train", "--base-model", world["base"], "--train-file", str(world["files"]["train"]),
           "--output-dir", str(tmp_path / "ddp"), "--experts", *[f"{k}={v}" for k, v in world["experts"].items()],
           "--max-length", "32", "--per-device-batch-size", "4", "--learning-rate", "0.02", "--max-steps", "6",
           "--save-every", "100", "--seed", "3", "--head-dropout", "0.0", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es), global batch 8" in proc.stdout
    a, b = head_of(single), head_of(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_output_dir_protection(world, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(TrainingError, match="exists and is not an xlora training directory; pass --resume"):
        train(config(world, foreign, max_steps=1))
    train(config(world, foreign, max_steps=1, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "precious"  # overwrite never deletes the user's files
    with pytest.raises(TrainingError, match="holds a previous run; pass --resume to continue it or --overwrite"):
        train(config(world, foreign, max_steps=1))
    (foreign / "tensorboard").mkdir(exist_ok=True)
    (foreign / "tensorboard" / "events.old-run").write_text("")
    (foreign / "checkpoints" / "step-00000009").mkdir()
    train(config(world, foreign, max_steps=2, save_every=1, overwrite=True))  # a run of ours is replaced whole
    assert not (foreign / "tensorboard" / "events.old-run").exists()
    assert sorted(p.name for p in (foreign / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert (foreign / "notes.txt").read_text() == "precious"
    with pytest.raises(TrainingError, match="holds no run to resume"):
        train(config(world, tmp_path / "empty", max_steps=1, resume=True))


def test_non_finite_loss_stops_with_a_clear_message(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"(loss became (nan|inf)|became non-finite).*(Lower --learning-rate)"):
        train(config(world, out, max_steps=40, save_every=1, learning_rate=1e30, max_grad_norm=0.0, enable_softmax=False))
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts, "the steps before the blow-up were checkpointed"
    for t in head_of(ckpts[-1]).values():
        assert torch.isfinite(t).all()


def test_lr_schedule_and_regularizers_by_hand():
    assert [round(lr_factor(s, 2, 10), 6) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(4, 0, 8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]]])  # [1, 3, 1, 2]
    mask = torch.tensor([[1, 1, 0]])
    assert float(scalings_regularizer(s, mask, "balance")) == pytest.approx(2 * (0.25 + 0.25))
    assert float(scalings_regularizer(s, mask, "entropy")) == pytest.approx(0.0, abs=1e-6)
    assert float(scalings_regularizer(s, torch.tensor([[0, 0, 1]]), "entropy")) == pytest.approx(math.log(2))


def test_trains_under_hf_trainer(world, tmp_path):
    from transformers import Trainer, TrainingArguments

    from xlora import XLoraConfig

    tok = world["tok"]
    from transformers import AutoModelForCausalLM

    model = XLoraModel(AutoModelForCausalLM.from_pretrained(world["base"]),
                       XLoraConfig(experts=world["experts"], head_dropout=0.0))
    texts = [json.loads(line)["text"] for line in world["files"]["train"].read_text().splitlines()]
    enc = tok(texts, return_tensors="pt")
    dataset = [{"input_ids": ids, "labels": ids} for ids in enc["input_ids"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=20,
                             learning_rate=2e-2, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=5, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    out = trainer.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("head.")}
    logs = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logs[-1] < logs[0] and out.global_step == 20


def test_bf16_mixed_precision_tracks_the_float32_run(world, tmp_path):
    """Accelerate's bf16 autocast (CPU here): the same head training, losses within bf16 rounding of the
    fp32 run's, and the saved head stays float32 (autocast computes in bf16, weights are not cast)."""
    runs = {}
    for mp in ("no", "bf16"):
        train(config(world, tmp_path / mp, max_steps=10, log_every=1, mixed_precision=mp))
        lines = (tmp_path / mp / "metrics.jsonl").read_text().splitlines()
        runs[mp] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(runs["no"]) == len(runs["bf16"]) == 10
    diffs = [abs(a - b) / a for a, b in zip(runs["no"], runs["bf16"])]
    assert max(diffs) < 0.05, diffs  # bf16 has an 8-bit mantissa: ~1% per op, not a different run
    assert any(d > 0 for d in diffs)  # and autocast really was on
    head = head_of(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in head.values())


def test_a_base_model_that_is_not_there_is_named_before_anything_is_written(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot load the base model's tokenizer '.*nowhere'.*--base-model"):
        train(config(world, tmp_path / "run", base_model=str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ bad input, leftovers, memory
def break_input(world, tmp_path: Path, broken: str) -> tuple[dict, callable]:
    """Options with one broken input, and a function that repairs it in place (same paths, same command)."""
    train_lines = world["files"]["train"].read_text().splitlines()
    paths = {"train_file": tmp_path / "train.jsonl", "eval_file": tmp_path / "eval.jsonl",
             "experts": tmp_path / "letters-expert"}
    good_train = "\n".join(train_lines[:40]) + "\n"
    paths["train_file"].write_text(good_train)
    paths["eval_file"].write_text(world["files"]["eval"].read_text())
    shutil.copytree(world["experts"]["letters"], paths["experts"])
    opts = {"train_file": str(paths["train_file"]), "eval_file": str(paths["eval_file"]),
            "experts": {"letters": str(paths["experts"]), "digits": world["experts"]["digits"]}}
    if broken == "experts":
        shutil.rmtree(paths["experts"])
        return opts, lambda: shutil.copytree(world["experts"]["letters"], paths["experts"])
    paths[broken].write_text(train_lines[0] + '\n{"text": "cut\n')
    return opts, lambda: paths[broken].write_text(good_train)


@pytest.mark.parametrize("broken, error", [("train_file", r"train\.jsonl: line 2 is not valid JSON"),
                                           ("eval_file", r"eval\.jsonl: line 2 is not valid JSON"),
                                           ("experts", r"letters-expert")])
def test_bad_input_writes_nothing_and_the_same_command_runs_once_fixed(world, tmp_path, broken, error):
    out = tmp_path / "run"
    opts, repair = break_input(world, tmp_path, broken)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        train(config(world, out, max_steps=2, save_every=1, **opts))
    assert not out.exists()
    repair()
    cfg = config(world, out, max_steps=2, save_every=1, **opts)  # the same command: no --overwrite
    given = cfg.to_dict()
    result = train(cfg)
    assert result.steps == 2 and result.eval_loss is not None
    assert json.loads((out / "train_config.json").read_text()) == given == cfg.to_dict()  # cfg left as given
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_overwrite_with_bad_data_keeps_the_previous_run(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=2, save_every=1))
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    opts, _ = break_input(world, tmp_path, "train_file")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        train(config(world, out, max_steps=2, overwrite=True, **opts))
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and len(before) > 8


def test_a_kill_during_the_final_save_is_tidied_by_the_next_start(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=4, save_every=2, log_every=1))
    # what `kill -9` during the final save (and an earlier prune) leaves behind
    (out / "xlora_head.safetensors").unlink()
    (out / ".xlora_head.safetensors.k2j3h4.tmp").write_bytes(b"half a file")
    (out / "checkpoints" / ".tmp-step-00000006").mkdir()
    (out / "checkpoints" / ".trash-step-00000002-41-0").mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.0}\n{"step": 10, "lo')  # steps beyond the checkpoint, a cut line
    (out / ".notes.tmp").write_text("the user's")
    result = train(config(world, out, max_steps=4, save_every=2, log_every=1, resume=True))
    assert result.steps == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".notes.tmp"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (out / "xlora_head.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_fp16_on_cpu_is_refused_before_anything_is_written(world, tmp_path):
    with pytest.raises(TrainingError, match=r"mixed_precision='fp16' needs a GPU.*--mixed-precision bf16"):
        train(config(world, tmp_path / "run", mixed_precision="fp16"))
    assert not (tmp_path / "run").exists()


def test_accelerate_configured_otherwise_in_the_process_is_refused_clearly(world, tmp_path):
    code = ("import json, sys\n"
            "from accelerate import Accelerator\n"
            "Accelerator(mixed_precision='bf16', cpu=True)  # someone else's code, earlier in the process\n"
            "from xlora.train import TrainConfig, TrainingError, train\n"
            "try:\n"
            "    train(TrainConfig.from_dict(json.loads(sys.argv[1])))\n"
            "except TrainingError as err:\n"
            "    print('refused:', err)\n")
    opts = config(world, tmp_path / "run", max_steps=1).to_dict()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(opts)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"refused: Accelerate refused the trainer's setup \(mixed_precision='no', cpu=True\).*"
                     r"create it with mixed_precision='no'.*or run xlora train in its own process", proc.stdout)
    assert not (tmp_path / "run").exists()


def test_a_50_mb_line_trains_in_bounded_memory(world, tmp_path):
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"text": LETTERS * 2_000_000}) + "\n")  # one 52 MB line
        f.writelines(line + "\n" for line in world["files"]["train"].read_text().splitlines()[:15])
    assert data.stat().st_size > 50_000_000
    # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork + exec
    code = ("import re, sys\n"
            "from xlora.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "status = open('/proc/self/status').read()\n"
            "print('peak_rss_kb', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
            "sys.exit(rc)\n")
    cmd = [sys.executable, "-c", code, "train", "--base-model", world["base"], "--train-file", str(data),
           "--output-dir", str(tmp_path / "run"), "--experts", *[f"{k}={v}" for k, v in world["experts"].items()],
           "--max-length", "32", "--per-device-batch-size", "4", "--max-steps", "1", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "16 training examples (1 truncated to 32 tokens)" in proc.stdout
    peak = int(re.search(r"peak_rss_kb (\d+)", proc.stdout).group(1)) * 1024
    assert peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MiB"
    assert elapsed < 120
    assert (tmp_path / "run" / "xlora_head.safetensors").is_file()


def test_the_fp16_loss_scaling_path_steps_checkpoints_and_resumes_its_scale(world, tmp_path):
    """fp16 needs a GPU, so its gradient-scaler path (scale the loss, unscale before clipping, skip overflowing
    steps, checkpoint and restore the scale) is driven here by hand on CPU, where autocast supports fp16 too."""
    from xlora.train.checkpoints import newest_valid_checkpoint
    from xlora.train.setup import Precision, make_optimizer, setup
    from xlora.train.trainer import save_training_checkpoint, train_step

    cfg = config(world, tmp_path / "run", max_steps=6, max_grad_norm=1.0)
    run = setup(cfg)
    # a scale that must overflow in fp16 at first, and falls to 2**10 at the first skipped step
    run.precision = Precision("cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**40,
                                                                         backoff_factor=2.0**-30))
    before = {n: p.detach().clone() for n, p in run.model.head.named_parameters()}
    results = [train_step(run, step) for step in range(6)]
    assert all(math.isfinite(r.loss) and r.grad_norm is not None for r in results)
    scale = run.precision.scaler.get_scale()
    assert scale == 2.0**10  # the first step overflowed in fp16 and was skipped; the next ones did not
    assert any(not torch.equal(before[n], p) for n, p in run.model.head.named_parameters())  # later ones stepped
    # norms of the true gradients (~0.3 here), measured after unscaling: 2**10 times less than the scaled ones
    assert not math.isfinite(results[0].grad_norm) and all(0 < r.grad_norm < 5 for r in results[1:])
    save_training_checkpoint(run, 6, {"train_loss": results[-1].loss})
    resumed = newest_valid_checkpoint(run.out)
    assert resumed[1]["grad_scaler"]["scale"] == scale
    fresh = Precision("cpu", torch.float16, torch.amp.GradScaler("cpu"))
    make_optimizer(cfg, run.params, resumed, fresh)
    assert fresh.scaler.get_scale() == scale


def test_a_launcher_mixed_precision_that_is_not_used_is_named(monkeypatch):
    from xlora.train.setup import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    with pytest.warns(UserWarning, match=r"mixed precision 'bf16' from the launcher .* this run uses "
                                         r"mixed_precision='no': pass --mixed-precision bf16"):
        accelerator = make_accelerator("no")
    assert accelerator.mixed_precision == "no"  # Accelerate itself always stays at 'no' (we autocast)


# ------------------------------------------------------------------ resume: the same run, or a clear refusal
def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_resume_refuses_other_model_options_in_one_line_and_writes_nothing(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=4, save_every=2, head_depth=2, head_hidden_size=16))
    before = files_of(out)
    fewer = {"letters": world["experts"]["letters"]}
    with pytest.raises(TrainingError) as err:
        train(config(world, out, max_steps=6, save_every=2, head_depth=2, head_hidden_size=32, experts=fewer,
                     learning_rate=0.01, resume=True))
    assert str(err.value) == (
        f"cannot resume {str(out)!r} with other options than its run's (train_config.json): learning_rate 0.02 -> "
        f"0.01; experts {world['experts']!r} -> {fewer!r}; head_hidden_size 16 -> 32. Only max_steps, num_epochs, "
        "save_every, eval_every, log_every, keep_checkpoints, progress, resume, overwrite may change on resume: "
        "pass the run's values again, or train into a new output_dir (or --overwrite)")
    assert "\n" not in str(err.value)
    assert files_of(out) == before  # train_config.json still describes the run's model
    # the schedule may change: two more steps, and train_config.json records the new max_steps
    result = train(config(world, out, max_steps=6, save_every=2, log_every=1, head_depth=2, head_hidden_size=16,
                          resume=True))
    assert (result.steps, result.finished_before) == (6, False) and math.isfinite(result.train_loss)
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 6


def test_resuming_a_finished_run_says_so_through_the_cli_and_a_config_file(world, tmp_path, capsys):
    from xlora.cli import main

    project = tmp_path / "project"
    project.mkdir()
    rel = {k: os.path.relpath(v, project) for k, v in world["experts"].items()}  # relative to the file's folder
    (project / "train.json").write_text(json.dumps({
        "base-model": world["base"], "train-file": os.path.relpath(world["files"]["train"], project),
        "experts": rel, "max-length": 32, "per-device-batch-size": 8, "save-every": 2, "seed": 3,
        "head-dropout": 0.0}))
    out = tmp_path / "run"
    argv = ["train", "--config", str(project / "train.json"), "--output-dir", str(out), "--max-steps", "2",
            "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[-1]
    loss = float(re.fullmatch(rf"trained 2 steps: train loss (\d\.\d+); model in {re.escape(str(out))}", first)[1])
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["train_loss"] == pytest.approx(loss, abs=5e-5)
    head = head_of(out)
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == (f"{out} already finished: its checkpoint is at step 2 and this schedule ends "
                                        "at step 2; nothing to train (raise --max-steps to train it further)")
    assert "nan" not in printed and "trained" not in printed
    assert all(torch.equal(head[k], v) for k, v in head_of(out).items())
    assert main([*argv, "--resume", "--head-hidden-size", "64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"xlora train: error: cannot resume {str(out)!r}")
    assert "head_hidden_size 2048 -> 64. Only max_steps" in err


def test_a_missing_data_file_is_named_by_its_setting_and_an_output_file_refused(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^eval_file \(--eval-file\) '.*nope\.jsonl' does not exist"):
        train(config(world, tmp_path / "run", eval_file=str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match=r"^train_file \(--train-file\) '.*nope\.jsonl' does not exist"):
        train(config(world, tmp_path / "run", train_file=str(tmp_path / "nope.jsonl")))
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^output_dir '.*file' is a file, not a folder"):
        config(world, tmp_path / "file")
