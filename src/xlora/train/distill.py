"""Distilling a shallow scaling head: a head over the first ``k`` decoder layers learns the full head's scalings.

A head trained with ``scaling_pass_layers = k`` from scratch on the LM loss may not learn to route at all;
distillation gives it the teacher's routing as a dense target instead. With the teacher's head ``head_T``
over the last hidden state of all its scaling pass's layers ``h_N`` and the student's ``head_S`` over the
state after the first ``k`` layers (and the final norm) ``h_k``, both ``[b, t, hidden]``:

    z_T = head_T.logits(h_N),  z_S = head_S.logits(h_k)           # [b, t, L, E], z_T without grad
    log p_T = log_softmax(z_T / τ),  log p_S = log_softmax(z_S / τ)   over E
    KL  = Σ_{b,t} m_bt · mean_l Σ_e p_T (log p_T − log p_S) / Σ_{b,t} m_bt
    MSE = Σ_{b,t} m_bt · mean_{l,e} (s_S − s_T)² / Σ_{b,t} m_bt     # s = head(h): the applied scalings
    loss = KL (or MSE) + lm_weight · CE(X-LoRA forward with s_S)

``m`` is the attention mask (1 on real tokens; with ``positions='scored'`` only those predicting a completion)
and ``τ`` the distillation temperature (default the teacher's ``softmax_temperature``, so ``p`` are the
scalings before any top-k). The KL is taken on log-probabilities for stability. Both scaling passes run
without grad (the base is frozen): only the student head trains, and with ``lm_weight = 0`` no main pass runs
at all, so a step costs about ``1 + k/N`` base forwards. The reported KL and top-1 agreement (argmax over
experts of the applied scalings, per real token and module) are at the model's temperature, over every token.

The output is a complete X-LoRA directory (``scaling_pass_layers = k``, the student head, the teacher's
experts referenced as the teacher references them), plus ``distill_metrics.jsonl`` and ``distill.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xlora import XLoraConfig, XLoraModel
from xlora.config import check_bool, check_float, check_int
from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.generation import pad_token_id
from xlora.head import ScalingHead
from xlora.saving import CONFIG_FILE, HEAD_FILE
from xlora.train.data import TokenizedExample, batch_order, build_dataset, collate
from xlora.train.losses import scored_positions
from xlora.train.trainer import lr_factor

METRICS_FILE = "distill_metrics.jsonl"
REPORT_FILE = "distill.json"
LOSSES = ("kl", "mse")
INITS = ("teacher", "scratch")
POSITIONS = ("all", "scored")  # the tokens the distillation loss averages


@dataclass
class DistillConfig:
    """Distilling a teacher X-LoRA's head into a head over the first ``k`` decoder layers.

    Args:
        teacher_dir: an X-LoRA directory (any format xlora reads) whose head is the teacher.
        output_dir: where the student X-LoRA directory goes (not the teacher's).
        scaling_pass_layers: ``k``, the decoder layers the student's scaling pass runs (1..N).
        train_file: records of any shape ``xlora train`` reads (text, prompt/completion, messages).
        eval_file: held-out records for the initial and final KL and top-1 agreement (default: train_file).
        steps: optimizer steps.
        batch_size: examples per step.
        learning_rate: AdamW's peak learning rate (linear warm-up, then cosine decay to 0).
        warmup_steps: steps of linear warm-up.
        max_grad_norm: gradient clipping (0 disables).
        seed: seeds the data order, a scratch head's weights and dropout.
        loss: ``"kl"`` (teacher || student over the experts, needs a softmax head) or ``"mse"`` on the scalings.
        temperature: distillation temperature τ of the KL (None: the teacher's softmax_temperature).
        lm_weight: weight of the LM loss of the X-LoRA forward with the student's scalings (0: pure distillation).
        positions: the tokens the distillation averages: ``"all"`` real tokens or ``"scored"`` (those predicting a
            completion token, where ``xlora eval`` measures routing).
        init: ``"teacher"`` (start from the teacher head's weights) or ``"scratch"`` (a fresh head).
        chat: render prompt/completion records with the chat template, as ``xlora train --chat``.
        max_length: tokens per example (longer records are truncated).
        base_model: base model folder (None: the one the teacher records).
        device: ``"cpu"``, ``"cuda"``, ... (None: cuda when available, else cpu).
        overwrite: allow a non-empty output_dir (the student's files in it are replaced).
        log_every: print a progress line every this many steps.
    """

    teacher_dir: str
    output_dir: str
    scaling_pass_layers: int
    train_file: str
    eval_file: str | None = None
    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    loss: str = "kl"
    temperature: float | None = None
    lm_weight: float = 0.0
    positions: str = "all"
    init: str = "teacher"
    chat: bool = False
    max_length: int = 512
    base_model: str | None = None
    device: str | None = None
    overwrite: bool = False
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("teacher_dir", "output_dir", "train_file"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"{name} is required, got {value!r}: give a path")
            setattr(self, name, str(value))
        check_int("scaling_pass_layers", self.scaling_pass_layers, 1)
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0), ("max_length", 2),
                              ("log_every", 1)):
            check_int(name, getattr(self, name), minimum)
        for name in ("learning_rate", "max_grad_norm", "lm_weight"):
            setattr(self, name, check_float(name, getattr(self, name)))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}: e.g. 1e-3")
        for name in ("max_grad_norm", "lm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature is not None and check_float("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0 (or None: the teacher's), got {self.temperature}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}: 'kl' for softmax heads, else 'mse'")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("chat", "overwrite"):
            check_bool(name, getattr(self, name))
        if Path(self.output_dir).resolve() == Path(self.teacher_dir).resolve():
            raise ValueError(f"output_dir={self.output_dir!r} is the teacher's directory: the student would "
                             "overwrite the teacher's head; give another folder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DistillResult:
    """What :func:`distill` did: steps, seconds, and KL / top-1 agreement on the eval data before and after."""

    output_dir: Path
    steps: int
    seconds: float
    initial: dict[str, float]
    final: dict[str, float]


def distill(cfg: DistillConfig) -> DistillResult:
    """Train a student head for ``cfg.scaling_pass_layers`` layers on the teacher's scalings; write ``output_dir``.

    Everything (teacher, data, ``k``) is loaded and checked before anything is written.
    """
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"output_dir {str(out)!r} is not empty; pass overwrite=True (--overwrite) or another folder")
    model, tokenizer = load_teacher(cfg)
    train_set = build_dataset(cfg.train_file, tokenizer, cfg.max_length, chat=cfg.chat)[0]
    eval_set = build_dataset(cfg.eval_file, tokenizer, cfg.max_length, chat=cfg.chat)[0] if cfg.eval_file else train_set
    torch.manual_seed(cfg.seed)
    student = make_student(model, cfg.scaling_pass_layers, cfg.init)
    pad, k = pad_token_id(tokenizer), cfg.scaling_pass_layers
    initial = evaluate_student(model, student, k, eval_set, cfg.batch_size, pad)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / METRICS_FILE, "w", encoding="utf-8") as metrics:
        run_steps(model, student, cfg, train_set, pad, metrics)
    seconds = time.perf_counter() - start
    final = evaluate_student(model, student, k, eval_set, cfg.batch_size, pad)
    save_student(model, student, cfg, out)
    tokenizer.save_pretrained(str(out))
    report = {"settings": cfg.to_dict(), "seconds": seconds, "num_decoder_layers": decoder_depth(model),
              "teacher_layers": model.xlora_config.scaling_pass_layers or decoder_depth(model),
              "train_examples": len(train_set), "eval_examples": len(eval_set),
              "eval_on": "eval_file" if cfg.eval_file else "train_file", "initial": initial, "final": final}
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return DistillResult(out, cfg.steps, seconds, initial, final)


def load_teacher(cfg: DistillConfig) -> tuple[XLoraModel, Any]:
    """The teacher X-LoRA (eval mode, on ``cfg.device``) and its tokenizer; refuses a ``k`` or loss it cannot take."""
    from xlora.pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.teacher_dir, base_model=cfg.base_model)
    n = decoder_depth(model)
    if cfg.scaling_pass_layers > n:
        raise ValueError(f"scaling_pass_layers={cfg.scaling_pass_layers} exceeds the base model's {n} decoder "
                         f"layers; use 1..{n}")
    if cfg.loss == "kl" and not model.xlora_config.enable_softmax:
        raise ValueError("loss='kl' needs a teacher whose head ends in a softmax (enable_softmax=True): its "
                         "scalings are then a distribution over the experts; use loss='mse'")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def decoder_depth(model: XLoraModel) -> int:
    """``N``: the base model's decoder layers (checked through :meth:`XLoraModel.scaling_pass`'s own rule)."""
    from xlora.bases import check_scaling_pass_layers, decoder_layers

    check_scaling_pass_layers(1, model.base_model)  # a base without a list of blocks cannot run k layers
    return len(decoder_layers(model.base_model.base_model)[1])


def make_student(model: XLoraModel, k: int, init: str) -> ScalingHead:
    """A float32 head of the teacher's shape for ``scaling_pass_layers = k``: the teacher's weights or fresh ones."""
    cfg = XLoraConfig.from_dict({**model.xlora_config.to_dict(), "scaling_pass_layers": k})
    student = ScalingHead(cfg, cfg.hidden_size, model.num_layers, model.num_experts).to(model.device, torch.float32)
    if init == "teacher":
        student.load_state_dict({n: t.float() for n, t in model.head.state_dict().items()})
    return student


def scalings_pair(model: XLoraModel, k: int,
                  batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_T, s_T, h_k)``: the teacher's logits and scalings (float32, ``[b, t, L, E]``) and the student's input."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = model.head
    with torch.no_grad():
        h_n = model.scaling_pass(**inputs).to(head.layers[0].weight.dtype)  # [b, t, hidden]
        z_t, s_t = head.logits(h_n).float(), head(h_n).float()
        h_k = model.scaling_pass(layers=k, **inputs).float()  # [b, t, hidden]
    return z_t, s_t, h_k


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token`` ``[b, t]`` over the positions where ``mask`` ``[b, t]`` is 1."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def distill_kl(z_t: torch.Tensor, z_s: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean over real tokens and l of Σ_e p_T log(p_T / p_S)``, ``p = softmax(z / temperature)``; z ``[b, t, L, E]``."""
    # float64: near the optimum a float32 KL's gradient is rounding noise, which Adam scales up to lr-sized steps
    log_t = torch.log_softmax(z_t.double() / temperature, dim=-1)
    log_s = torch.log_softmax(z_s.double() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # [b, t, L]
    return masked_mean(kl.mean(-1), mask)


def distill_mse(s_t: torch.Tensor, s_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean over real tokens of mean_{l,e} (s_S − s_T)²``; s ``[b, t, L, E]``."""
    return masked_mean((s_s - s_t).pow(2).mean((-2, -1)), mask)


def top1_agreement(s_t: torch.Tensor, s_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of (real token, adapted module) pairs where both scalings ``[b, t, L, E]`` pick the same top expert."""
    same = (s_t.argmax(-1) == s_s.argmax(-1)).float().mean(-1)  # [b, t]
    return masked_mean(same, mask)


def step_loss(model: XLoraModel, student: ScalingHead, cfg: DistillConfig,
              batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch (with grad into ``student`` only) and its parts for the metrics."""
    z_t, s_t, h_k = scalings_pair(model, cfg.scaling_pass_layers, batch)
    mask = batch["attention_mask"]
    if cfg.positions == "scored":
        mask = mask * scored_positions(batch["labels"]).to(mask.dtype)  # [b, t]
    s_s = student(h_k)  # [b, t, L, E]
    if cfg.loss == "kl":
        tau = cfg.temperature or model.xlora_config.softmax_temperature
        loss = distill_kl(z_t, student.logits(h_k), mask, tau)
    else:
        loss = distill_mse(s_t, s_s, mask)
    parts = {cfg.loss: float(loss.detach()), "top1": float(top1_agreement(s_t, s_s.detach(), mask))}
    if cfg.lm_weight > 0:
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, scalings=s_s)  # every position
        parts["lm"] = float(out.loss.detach())
        loss = loss + cfg.lm_weight * out.loss
    parts["loss"] = float(loss.detach())
    return loss, parts


def run_steps(model: XLoraModel, student: ScalingHead, cfg: DistillConfig, examples: list[TokenizedExample],
              pad: int, metrics: Any) -> None:
    """``cfg.steps`` AdamW steps on ``student``; one JSON line per step to ``metrics`` (step, loss, top1, lr)."""
    params = list(student.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    lengths = [len(e.input_ids) for e in examples]
    per_epoch = -(-len(examples) // cfg.batch_size)
    student.train()
    for step in range(cfg.steps):
        epoch, pos = divmod(step, per_epoch)
        indices = batch_order(lengths, cfg.batch_size, cfg.seed, epoch, group_by_length=True)[pos]
        batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in indices], pad).items()}
        loss, parts = step_loss(model, student, cfg, batch)
        if not torch.isfinite(loss):
            raise ValueError(f"the distillation loss became {loss.item()} at step {step + 1}; lower learning_rate")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = cfg.learning_rate * lr_factor(step, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.write(json.dumps({"step": step + 1, **parts, "lr": lr}) + "\n")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            metrics.flush()
            print(f"distill step {step + 1}/{cfg.steps}: {cfg.loss} {parts[cfg.loss]:.5f} top1 {parts['top1']:.3f}")
    student.eval()


def evaluate_student(model: XLoraModel, student: ScalingHead, k: int, examples: list[TokenizedExample],
                     batch_size: int, pad: int) -> dict[str, float]:
    """KL (at the model's temperature, softmax heads only), MSE and top-1 agreement with the teacher,
    averaged over every real token of ``examples``; the student in eval mode (no dropout)."""
    was_training, tau = student.training, model.xlora_config.softmax_temperature
    student.eval()
    sums, tokens = {"kl": 0.0, "mse": 0.0, "top1": 0.0}, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {key: v.to(model.device) for key, v in collate(examples[i:i + batch_size], pad).items()}
            z_t, s_t, h_k = scalings_pair(model, k, batch)
            mask, s_s = batch["attention_mask"], student(h_k)
            n = int(mask.sum())
            if model.xlora_config.enable_softmax:
                sums["kl"] += float(distill_kl(z_t, student.logits(h_k), mask, tau)) * n
            sums["mse"] += float(distill_mse(s_t, s_s, mask)) * n
            sums["top1"] += float(top1_agreement(s_t, s_s, mask)) * n
            tokens += n
    student.train(was_training)
    result = {name: value / max(tokens, 1) for name, value in sums.items()}
    if not model.xlora_config.enable_softmax:
        del result["kl"]
    return {**result, "tokens": tokens}


def save_student(model: XLoraModel, student: ScalingHead, cfg: DistillConfig, out: Path) -> None:
    """Write ``xlora_config.json`` (``scaling_pass_layers = k``) and ``xlora_head.safetensors`` to ``out``.

    The experts are referenced as the teacher references them: an absolute path as it is, a relative
    one rewritten relative to ``out`` so that it names the same folder.
    """
    config = XLoraConfig.from_dict({**model.xlora_config.to_dict(), "scaling_pass_layers": cfg.scaling_pass_layers})
    experts = {}
    for expert in model.experts:
        given = model.xlora_config.experts[expert.name]
        experts[expert.name] = given if Path(given).is_absolute() else \
            Path(os.path.relpath(expert.path.resolve(), out.resolve())).as_posix()
    config.experts = experts
    if cfg.base_model is not None:  # the base it was distilled over
        base = Path(cfg.base_model)
        config.base_model_name_or_path = str(base.resolve()) if base.is_dir() else cfg.base_model
    atomic_save_safetensors(out / HEAD_FILE, student.state_dict(), metadata={"format": "pt"})
    config.to_json_file(out / CONFIG_FILE)
