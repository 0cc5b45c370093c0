"""Retraining the demo's assets: one PEFT LoRA expert per domain, then the X-LoRA head on the mixture.

Run ``python -m xlora.demo.retrain_suite OUT_DIR [experts | expert:<domain>] [head]`` (or :func:`retrain`); the
committed assets in ``xlora/demo/assets/`` were made this way. Experts are ordinary PEFT adapters
(``LoraConfig`` + ``get_peft_model``, r=8 on q/k/v/o/up/down, batches of 8, stored in bfloat16), trained
on completion tokens only: 160 steps each, 64 for ``graph`` (longer examples; its loss is flat by then).
The head (2 layers, global scalings: one mixture for all layers) is trained by
:func:`xlora.train.trainer.train` on a JSONL mix of all domains in their seen phrasings. The shipped protein, chemistry, mathematics and general
experts predate the phrasings (issue 15) and saw only each task's first wording; ``graph`` and the
head were trained on the seen phrasings (see ``training.json``). On 2 idle CPU cores an expert takes
6-12 minutes, the head about 10.

With ``--suite DATA_DIR`` the same command retrains on the science suite's files instead
(:mod:`xlora.demo.retrain_suite`: seven experts on ``DATA_DIR/train/<domain>.jsonl``, the head on
``DATA_DIR/head_train.jsonl``), checkpointed so that rerunning a stopped command loses nothing
(:func:`train_expert`'s ``checkpoint``: the same weights as an uninterrupted run).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from xlora.demo import domains
from xlora.demo.base_model import base_model_dir, cache_root, load_base
from xlora.demo.evaluate import chat_messages, completion_loss, left_padded
from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.generation import pad_token_id
from xlora.saving import CONFIG_FILE, HEAD_FILE
from xlora.train.data import tokenize_record
from xlora.train.loop_checkpoint import STOP, load_checkpoint, save_checkpoint

EXPERT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
EXPERT_STEPS, EXPERT_BATCH, EXPERT_LR, EXPERT_RANK = 160, 8, 1e-3, 8
EXPERT_STEPS_BY_DOMAIN = {"graph": 64}
HEAD_STEPS, HEAD_BATCH, HEAD_LR, HEAD_MAX_LENGTH = 150, 8, 2e-3, 192
SEED = 0
DEMO_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def chat_record(record: dict[str, Any]) -> dict[str, Any]:
    """A domain record as a ``{"messages"}`` training record (system, user prompt, assistant completion)."""
    return {"messages": chat_messages(record)}


def _examples(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[Any]:
    """Domain records (``prompt``/``completion``) or trainer records (``messages``) as chat examples."""
    return [tokenize_record(r if "messages" in r else chat_record(r), tokenizer, max_length, i)[0]
            for i, r in enumerate(records)]


def train_expert(base_dir: str | os.PathLike, records: list[dict[str, Any]], out_dir: str | os.PathLike, *,
                 steps: int = EXPERT_STEPS, batch_size: int = EXPERT_BATCH, lr: float = EXPERT_LR,
                 rank: int = EXPERT_RANK, targets: list[str] | None = None, seed: int = SEED,
                 log_every: int = 20, max_length: int = 256, checkpoint: str | os.PathLike | None = None,
                 save_every: int = 20, max_new_steps: int | None = None, data_id: str = "") -> dict[str, Any]:
    """Train one PEFT LoRA expert on ``records`` and save it (PEFT format, safetensors) to ``out_dir``.

    AdamW, linear warm-up over 10 % of the steps then cosine decay; batches drawn without replacement from a
    seeded permutation. ``records`` are domain records or trainer ``messages`` records. With ``checkpoint``
    (a file path), the state is saved every ``save_every`` steps and a rerun with the same settings and data
    (``data_id``) continues from it, to the same weights as an uninterrupted run; ``max_new_steps`` stops
    this call early (checkpointed, nothing saved to ``out_dir``); so does :data:`STOP` (set by the command's
    SIGTERM/SIGINT handler), which then raises ``SystemExit``. Returns ``{"steps", "seconds",
    "first_loss", "last_loss", "finished", "resumed_from"}`` (``seconds``: this call's).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, tokenizer = load_base(base_dir)
    pad = pad_token_id(tokenizer)
    targets = targets or EXPERT_TARGETS
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(model, cfg)
    model.train()
    examples = _examples(records, tokenizer, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "rank": rank, "targets": list(targets),
                "seed": seed, "max_length": max_length, "records": len(records), "data": data_id}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    rng = random.Random(seed)
    start, order, losses = _resume(ckpt, params, opt, settings, rng, steps)
    warm = max(1, steps // 10)
    end = steps if max_new_steps is None else min(steps, start + max_new_steps)
    t0 = time.perf_counter()
    for step in range(start, end):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch_size], order[batch_size:]
        factor = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        losses.append(_train_step(model, opt, params, left_padded([examples[i] for i in idx], pad), lr * factor))
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  step {step + 1}/{steps} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        stop = ckpt is not None and STOP.is_set() and step + 1 < end
        if ckpt is not None and ((step + 1) % save_every == 0 or step + 1 == end or stop) and step + 1 < steps:
            save_checkpoint(ckpt, params, opt, {"step": step + 1, "order": order, "losses": losses,
                                                 "rng": list(rng.getstate()), "settings": settings})
        if stop:
            raise SystemExit(f"stopped after step {step + 1}/{steps} (checkpoint {ckpt}); rerun to continue")
    seconds = time.perf_counter() - t0
    stats = {"steps": steps, "seconds": round(seconds, 1), "first_loss": losses[0] if losses else None,
             "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None, "finished": end == steps,
             "resumed_from": start}
    if end == steps:
        _save_expert(model, Path(out_dir), ckpt)
    return stats


def _resume(ckpt: Path | None, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
            settings: dict[str, Any], rng: random.Random, steps: int) -> tuple[int, list[int], list[float]]:
    """Restore ``ckpt`` (if it was written with ``settings``) into ``params``, ``opt`` and ``rng``; returns
    ``(start step, batch order left, losses so far)``, ``(0, [], [])`` when starting afresh."""
    state = load_checkpoint(ckpt, params, opt, settings) if ckpt is not None else None
    if state is None:
        return 0, [], []
    rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
    print(f"  resuming from step {state['step']}/{steps} ({ckpt})", flush=True)
    return state["step"], state["order"], state["losses"]


def _train_step(model: Any, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                batch: dict[str, torch.Tensor], lr: float) -> float:
    """One AdamW step at learning rate ``lr`` on the completion loss of ``batch`` (gradients clipped to norm 1)."""
    loss = completion_loss(model, batch)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _save_expert(model: Any, out_dir: Path, ckpt: Path | None) -> None:
    """Save the finished expert (PEFT format, no model card) and drop its checkpoint, now stale."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _drop_readme(out_dir)
    if ckpt is not None and ckpt.is_file():
        ckpt.unlink()


def _drop_readme(path: Path) -> None:
    readme = path / "README.md"  # PEFT writes a model card template; the assets do not need it
    if readme.is_file():
        readme.unlink()


def finish_adapter(adapter_dir: Path, portable: bool) -> None:
    """Store a trained expert as the assets keep it: weights in bfloat16 and, when it was trained on the demo's
    own base (``portable``), that base's public id in ``adapter_config.json`` rather than this machine's path."""
    _to_bf16(adapter_dir)
    if portable:
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = DEMO_BASE_ID
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2) + "\n")


def _to_bf16(adapter_dir: Path) -> None:
    """Store an adapter's weights in bfloat16 (half the size; the fused layers cast to the model's dtype)."""
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
    atomic_save_safetensors(path, tensors, metadata={"format": "pt"})


def train_experts(out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                  domain_names: tuple[str, ...] = domains.DOMAINS, steps: int | None = None,
                  max_length: int = 256) -> dict[str, Any]:
    """One expert per domain under ``out_dir/experts/<domain>``; returns per-domain timings and losses.

    ``steps``: for every domain (default :data:`EXPERT_STEPS_BY_DOMAIN`, else :data:`EXPERT_STEPS`)."""
    portable = base_dir is None  # the demo's own base: record its public id, not this machine's cache path
    base_dir = Path(base_dir) if base_dir is not None else base_model_dir()
    stats = {}
    for domain in domain_names:
        n = steps or EXPERT_STEPS_BY_DOMAIN.get(domain, EXPERT_STEPS)
        records = domains.generate(domain, "train", n * EXPERT_BATCH, seed=SEED)
        print(f"expert {domain!r}: {len(records)} records, {n} steps", flush=True)
        target = Path(out_dir) / "experts" / domain
        stats[domain] = train_expert(base_dir, records, target, steps=n, max_length=max_length)
        finish_adapter(target, portable)
        print(f"expert {domain!r}: {stats[domain]}", flush=True)
    return stats


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(chat_record(r)) + "\n")
    return path


HEAD_OPTIONS: dict[str, Any] = {  # the shipped head's X-LoRA options (see xlora_config.json)
    "head_depth": 2, "head_hidden_size": 256, "layerwise_scalings": False, "head_dropout": 0.1,
}


def train_head(out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None, steps: int = HEAD_STEPS,
               work_dir: str | os.PathLike | None = None, *, lr: float = HEAD_LR, max_length: int = HEAD_MAX_LENGTH,
               options: dict[str, Any] | None = None, domain_names: tuple[str, ...] = domains.DOMAINS,
               files: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """Train the X-LoRA head over ``out_dir/experts/<domain>`` with :func:`xlora.train.trainer.train`; the head
    and its config land in ``out_dir`` (experts referenced relatively, ``experts/<domain>``).

    The data (unless ``files``: a train and an eval JSONL file) mixes the training split of every domain, each
    record in one of its seen phrasings (:mod:`xlora.demo.phrasings`). With ``files`` the run in
    ``work_dir/run`` resumes from its newest checkpoint when there is one. ``options`` override
    :data:`HEAD_OPTIONS` (any ``XLoraConfig`` or ``TrainConfig`` key, e.g. ``layerwise_scalings``,
    ``softmax_temperature``, ``top_k``, ``regularizer``).
    """
    from xlora import XLoraConfig
    from xlora.train.config import TrainConfig
    from xlora.train.trainer import train

    out = Path(out_dir)
    base_dir = Path(base_dir) if base_dir is not None else base_model_dir()
    work = Path(work_dir) if work_dir is not None else cache_root() / "demo_head_run"
    if files is None:
        n = steps * HEAD_BATCH // len(domain_names) + 1
        mix = domains.generate_mixture("train", n, seed=SEED + 1, domains=domain_names)
        files = (write_jsonl(work / "data" / "train.jsonl", mix),
                 write_jsonl(work / "data" / "eval.jsonl", domains.generate_mixture("validation", 8, seed=SEED,
                                                                                    domains=domain_names)))
        resume = False
    else:
        resume = (work / "run" / "train_config.json").is_file()
    run = work / "run"
    settings = {
        "base_model": str(base_dir), "train_file": str(files[0]), "eval_file": str(files[1]),
        "output_dir": str(run), "overwrite": not resume, "resume": resume, "bundle": False, "max_length": max_length,
        "per_device_batch_size": HEAD_BATCH, "max_steps": steps, "learning_rate": lr, "warmup_steps": 10,
        "save_every": 25, "log_every": 10, "seed": SEED, "progress": False,
        "experts": {d: str((out / "experts" / d).resolve()) for d in domain_names},
        **HEAD_OPTIONS, **(options or {}),
    }
    t0 = time.perf_counter()
    result = train(TrainConfig.from_dict(settings))
    seconds = time.perf_counter() - t0
    shutil.copyfile(run / HEAD_FILE, out / HEAD_FILE)
    xcfg = XLoraConfig.from_json_file(run / CONFIG_FILE)
    xcfg.experts = {d: f"experts/{d}" for d in xcfg.experts}
    xcfg.base_model_name_or_path = DEMO_BASE_ID
    xcfg.to_json_file(out / CONFIG_FILE)
    shutil.copyfile(run / "metrics.jsonl", out / "head_metrics.jsonl")
    return {"steps": result.steps, "seconds": round(seconds, 1), "train_loss": result.train_loss,
            "eval_loss": result.eval_loss, "lr": lr, "max_length": max_length, "batch_size": HEAD_BATCH,
            "train_file": str(files[0]), "eval_file": str(files[1]), "resumed": resume,
            "options": {**HEAD_OPTIONS, **(options or {})}, "torch_threads": torch.get_num_threads()}


def retrain(out_dir: str | os.PathLike, phases: tuple[str, ...] = ("experts", "head"), *,
            expert_steps: int | None = None, head_steps: int = HEAD_STEPS,
            head_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain the demo assets into ``out_dir``; writes ``out_dir/training.json``.

    ``phases`` run in order: ``"experts"`` (one expert per domain), ``"expert:<domain>[,<domain>...]"``
    (only those experts; the others in ``out_dir/experts`` stay), ``"head"`` (over every domain's expert).
    """
    plan = [_phase_domains(phase) for phase in phases]  # every phase checked before an hour of training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    for names in plan:
        if names is not None:
            log.setdefault("experts", {}).update(train_experts(out, domain_names=names, steps=expert_steps))
            log["experts_config"] = {"rank": EXPERT_RANK, "alpha": 2 * EXPERT_RANK, "targets": EXPERT_TARGETS,
                                     "batch_size": EXPERT_BATCH, "lr": EXPERT_LR,
                                     "torch_threads": torch.get_num_threads()}
        else:
            log["head"] = train_head(out, steps=head_steps, options=head_options)
        atomic_write_text(log_path, json.dumps(log, indent=2) + "\n")
    return log


def _phase_domains(phase: str) -> tuple[str, ...] | None:
    """The domains whose experts ``phase`` trains (``None`` for ``"head"``); a bad phase or domain raises."""
    if phase == "head":
        return None
    if phase == "experts":
        return domains.DOMAINS
    names = tuple(n for n in phase.split(":", 1)[1].split(",") if n) if phase.startswith("expert:") else ()
    if not names:
        raise ValueError(f"unknown retraining phase {phase!r}; use 'experts', 'expert:<domain>[,<domain>...]' or 'head'")
    unknown = [n for n in names if n not in domains.DOMAINS]
    if unknown:
        raise ValueError(f"retraining phase {phase!r} names unknown domains {unknown}; choose from {list(domains.DOMAINS)}")
    return names
