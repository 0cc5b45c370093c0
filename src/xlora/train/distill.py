"""Distilling a shallow scaling head: a head over the first ``k`` decoder layers learns the full head's scalings.

A head trained with ``scaling_pass_layers = k`` from scratch on the LM loss may not learn to route at all;
distillation gives it the teacher's routing as a dense target instead. With the teacher's head ``head_T``
over the last hidden state of all its scaling pass's layers ``h_N`` and the student's ``head_S`` over the
state after the first ``k`` layers (and the final norm) ``h_k``, both ``[b, t, hidden]`` (a ``head_prefix_mean``
head reads :func:`~xlora.head.head_input` of them):

    z_T = head_T.logits(h_N),  z_S = head_S.logits(h_k)           # [b, t, L, E], z_T without grad
    log p_T = log_softmax(z_T / τ),  log p_S = log_softmax(z_S / τ)   over E
    KL  = Σ_{b,t} m_bt · mean_l Σ_e p_T (log p_T − log p_S) / Σ_{b,t} m_bt
    MSE = Σ_{b,t} m_bt · mean_{l,e} (s_S − s_T)² / Σ_{b,t} m_bt     # s = head(h): the applied scalings
    loss = KL (or MSE) + scored_weight · KL_scored + lm_weight · CE(X-LoRA forward with s_S) + routing_weight · CE_route

``m`` is the attention mask (1 on real tokens; with ``positions='scored'`` only those predicting a completion;
with ``'unrouted'`` those that take no routing loss), ``KL_scored`` the same term with ``m`` the scored positions
(a second term, so the few answer positions weigh more than their share of tokens), ``τ`` the distillation temperature (default the teacher's
``softmax_temperature``, so ``p`` are the scalings before any top-k), and ``CE_route`` the routing supervision of
:mod:`xlora.train.routing` over the scored positions of the records that name their expert (``routing_key``).
With ``k = N``, ``init='teacher'``, ``positions='unrouted'`` and a routing weight this *corrects* a trained head:
it moves where the labels speak and keeps the teacher's scalings everywhere else (the suite head H16's recipe).
The KL is taken on log-probabilities for stability. Both scaling passes run without grad (the base is frozen):
only the student head trains, and with ``lm_weight = 0`` no main pass runs at all, so a step costs about
``(k_T + k)/N`` base forwards (``k_T`` the teacher's depth; ``k_T/N`` when ``k = k_T``, one pass). The reported KL and top-1 agreement (argmax
over experts of the applied scalings, per real token and module) are at the model's temperature, over every token.

The output is a complete X-LoRA directory (``scaling_pass_layers = k``, the student head, the teacher's
experts referenced as the teacher references them), plus ``distill_metrics.jsonl`` and ``distill.json``; while
a run is unfinished, ``distill_checkpoint.safetensors`` lets a rerun of the same settings continue it.
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

from xlora import XLoraConfig, XLoraModel
from xlora.files import atomic_save_safetensors, atomic_write_text
from xlora.generation import pad_token_id
from xlora.head import ScalingHead, head_input
from xlora.saving import CONFIG_FILE, HEAD_FILE
from xlora.train.data import TokenizedExample, batch_order, build_dataset, collate
from xlora.train.distill_config import REPORT_FILE, DistillConfig, resume_settings
from xlora.train.distill_losses import distill_kl, distill_mask, distill_mse, own_top1, top1_agreement
from xlora.train.loop_checkpoint import (
    STOP,
    load_checkpoint,
    open_metrics,
    rng_state,
    save_checkpoint,
    saved_state,
    set_rng,
)
from xlora.train.losses import with_routing_mask
from xlora.train.records import require_file
from xlora.train.routing import check_routing_targets, routing_cross_entropy
from xlora.train.trainer import lr_factor

METRICS_FILE = "distill_metrics.jsonl"
CHECKPOINT_FILE = "distill_checkpoint.safetensors"  # while a run is unfinished: its student, AdamW and RNG


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
    out, settings = Path(cfg.output_dir), resume_settings(cfg)
    saved = saved_state(out / CHECKPOINT_FILE)
    resumable = saved is not None and saved["settings"] == settings
    if out.exists() and any(out.iterdir()) and not cfg.overwrite and not resumable:
        raise ValueError(f"output_dir {str(out)!r} is not empty (and holds no checkpoint of this run to resume); pass "
                         "overwrite=True (--overwrite) or another folder")
    cfg.torch_device()  # a bad device or data path is refused before the teacher loads
    for path, what in ((cfg.train_file, "train_file (--data)"), (cfg.eval_file, "eval_file (--eval)")):
        if path is not None:
            require_file(path, what)
    model, tokenizer = load_teacher(cfg)
    if cfg.scaling_pass_layers is None:  # every layer
        cfg = dataclasses.replace(cfg, scaling_pass_layers=decoder_depth(model))
    train_set, eval_set, experts = datasets(cfg, tokenizer, model.xlora_config.expert_names)
    torch.manual_seed(cfg.seed)
    student = make_student(model, cfg.scaling_pass_layers, cfg.init, cfg.prefix_mean)
    batches = Batches(pad_token_id(tokenizer), experts, cfg.batch_size)
    if resumable and "initial" in saved:  # evaluated when the run started: the same head, data and settings
        initial = saved["initial"]
    else:
        initial = evaluate_student(model, student, eval_set, batches)
    out.mkdir(parents=True, exist_ok=True)
    seconds = run_steps(model, student, cfg, train_set, batches, {"settings": settings, "initial": initial})
    final = evaluate_student(model, student, eval_set, batches)
    save_student(model, student, cfg, out)
    tokenizer.save_pretrained(str(out))
    report = {"settings": cfg.to_dict(), "resume_settings": settings, "seconds": seconds,
              "num_decoder_layers": decoder_depth(model),
              "teacher_layers": teacher_depth(model),
              "train_examples": len(train_set), "eval_examples": len(eval_set),
              "eval_on": "eval_file" if cfg.eval_file else "train_file", "initial": initial, "final": final}
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # the run is complete
    return DistillResult(out, cfg.steps, seconds, initial, final)


@dataclass(frozen=True)
class Batches:
    """How examples become a batch on the model's device: the pad id, the experts whose routing targets travel
    with the batch (None: routing off) and the batch size."""

    pad: int
    experts: list[str] | None
    size: int

    def collate(self, examples: list[TokenizedExample], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate(examples, self.pad, experts=self.experts).items()}


def datasets(cfg: DistillConfig, tokenizer: Any,
             experts: list[str]) -> tuple[list[TokenizedExample], list[TokenizedExample], list[str] | None]:
    """The train and eval examples and, with routing on, the experts their targets name (refused if none does)."""
    key = cfg.routing_key if cfg.routing_weight > 0 else None
    train_set = build_dataset(cfg.train_file, tokenizer, cfg.max_length, chat=cfg.chat, routing_key=key)[0]
    eval_set = build_dataset(cfg.eval_file, tokenizer, cfg.max_length, chat=cfg.chat, routing_key=key)[0] \
        if cfg.eval_file else train_set
    if key is None:
        return train_set, eval_set, None
    check_routing_targets([e.target for e in train_set], experts, key, cfg.routing_weight)
    return train_set, eval_set, list(experts)


def load_teacher(cfg: DistillConfig) -> tuple[XLoraModel, Any]:
    """The teacher X-LoRA (eval mode, on ``cfg.device``) and its tokenizer; refuses a ``k`` or loss it cannot take."""
    from xlora.pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.teacher_dir, base_model=cfg.base_model)
    n = decoder_depth(model)
    if cfg.scaling_pass_layers is not None and cfg.scaling_pass_layers > n:
        raise ValueError(f"scaling_pass_layers={cfg.scaling_pass_layers} exceeds the base model's {n} decoder "
                         f"layers; use 1..{n}")
    if cfg.loss == "kl" and not model.xlora_config.enable_softmax:
        raise ValueError("loss='kl' needs a teacher whose head ends in a softmax (enable_softmax=True): its "
                         "scalings are then a distribution over the experts; use loss='mse'")
    if cfg.routing_weight > 0 and not model.xlora_config.enable_softmax:
        raise ValueError(f"routing_weight={cfg.routing_weight} needs a head that ends in a softmax (enable_softmax="
                         "True): the term is a cross-entropy of the scalings as a distribution; set routing_weight=0")
    return model.to(cfg.torch_device()).eval(), tokenizer


def decoder_depth(model: XLoraModel) -> int:
    """``N``: the base model's decoder layers (checked through :meth:`XLoraModel.scaling_pass`'s own rule)."""
    from xlora.bases import check_scaling_pass_layers, decoder_layers

    check_scaling_pass_layers(1, model.base_model)  # a base without a list of blocks cannot run k layers
    return len(decoder_layers(model.base_model.base_model)[1])


def make_student(model: XLoraModel, k: int, init: str, prefix_mean: bool | None = None) -> ScalingHead:
    """A float32 head of the teacher's shape for ``scaling_pass_layers = k``: the teacher's weights, fresh ones, or
    those of the X-LoRA directory ``init`` (refused unless its head has the same tensors and shapes). With
    ``prefix_mean`` unlike the teacher's ``head_prefix_mean``, the teacher's first layer is widened with zero
    columns for the running mean (the student starts as the teacher on ``h_k``)."""
    from safetensors.torch import load_file

    mean = model.xlora_config.head_prefix_mean if prefix_mean is None else prefix_mean
    cfg = XLoraConfig.from_dict({**model.xlora_config.to_dict(), "scaling_pass_layers": k, "head_prefix_mean": mean})
    student = ScalingHead(cfg, cfg.hidden_size, model.num_layers, model.num_experts).to(model.device, torch.float32)
    if init == "scratch":
        return student
    state = model.head.state_dict() if init == "teacher" else load_file(str(Path(init) / HEAD_FILE))
    want = {n: tuple(t.shape) for n, t in student.state_dict().items()}
    if init == "teacher" and mean and not model.xlora_config.head_prefix_mean:
        first = "layers.0.weight"  # [out, hidden] -> [out, 2·hidden]
        state = {**state, first: torch.cat([state[first], torch.zeros_like(state[first])], 1)}
    got = {n: tuple(t.shape) for n, t in state.items()}
    if got != want:
        raise ValueError(f"init={init!r}: its head's tensors {got} are not the student's {want} (the teacher's head "
                         "settings over the same experts); start from 'teacher' or 'scratch'")
    student.load_state_dict({n: t.float() for n, t in state.items()})
    return student


def scalings_pair(model: XLoraModel, student: ScalingHead,
                  batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_T, s_T, x_k)``: the teacher's logits and scalings (float32, ``[b, t, L, E]``) and the student's input
    (:func:`~xlora.head.head_input` of the state after its ``k`` layers; one scaling pass when ``k`` is the
    teacher's depth)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head, k, mask = model.head, student.config.scaling_pass_layers, batch["attention_mask"]
    with torch.no_grad():
        h_n = model.scaling_pass(**inputs)  # [b, t, hidden]
        h_k = h_n.float() if k == teacher_depth(model) else model.scaling_pass(layers=k, **inputs).float()
        x_n = head_input(model.xlora_config, h_n.to(head.layers[0].weight.dtype), mask)
        z_t, s_t = head.logits(x_n).float(), head(x_n).float()
    return z_t, s_t, head_input(student.config, h_k, mask)


def teacher_depth(model: XLoraModel) -> int:
    """The decoder layers the teacher's own scaling pass runs."""
    return model.xlora_config.scaling_pass_layers or decoder_depth(model)


def step_loss(model: XLoraModel, student: ScalingHead, cfg: DistillConfig,
              batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch (with grad into ``student`` only) and its parts for the metrics."""
    z_t, s_t, x_k = scalings_pair(model, student, batch)
    mask = distill_mask(batch, cfg.positions)  # [b, t]
    s_s = student(x_k)  # [b, t, L, E]
    tau = cfg.temperature or model.xlora_config.softmax_temperature
    z_s = student.logits(x_k) if cfg.loss == "kl" else None

    def match(where: torch.Tensor) -> torch.Tensor:  # the distillation term over the positions `where`
        return distill_kl(z_t, z_s, where, tau) if cfg.loss == "kl" else distill_mse(s_t, s_s, where)

    loss = match(mask)
    parts = {cfg.loss: float(loss.detach()), "top1": float(top1_agreement(s_t, s_s.detach(), mask))}
    if cfg.scored_weight > 0:
        scored = match(distill_mask(batch, "scored"))
        parts["scored"] = float(scored.detach())
        loss = loss + cfg.scored_weight * scored
    if cfg.lm_weight > 0:
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, scalings=s_s)  # every position
        parts["lm"] = float(out.loss.detach())
        loss = loss + cfg.lm_weight * out.loss
    if cfg.routing_weight > 0:
        routed = with_routing_mask(batch, "scored")  # p̄ over the scored positions, as xlora eval scores routing
        route = routing_cross_entropy(s_s, routed["routing_mask"], routed["routing_target"])
        parts["routing"] = float(route.detach())
        loss = loss + cfg.routing_weight * route
    parts["loss"] = float(loss.detach())
    return loss, parts


def run_steps(model: XLoraModel, student: ScalingHead, cfg: DistillConfig, examples: list[TokenizedExample],
              batches: Batches, run: dict[str, Any]) -> float:
    """``cfg.steps`` AdamW steps on ``student``, continuing a checkpoint of this run if there is one; one JSON line
    per step to ``METRICS_FILE`` (step, loss parts, top1, lr); a checkpoint every ``save_every`` steps and when a
    stop is requested (then ``SystemExit``); ``run`` (its ``settings`` and ``initial`` evaluation) travels in the
    checkpoint. Returns the seconds the steps took, over every call of the run."""
    params, out = list(student.parameters()), Path(cfg.output_dir)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    state = load_checkpoint(out / CHECKPOINT_FILE, params, optimizer, run["settings"]) or {"step": 0, "seconds": 0.0}
    if state["step"]:
        set_rng(state, model.device)  # dropout continues as if never stopped
        print(f"distill: resuming at step {state['step']}/{cfg.steps} from {out / CHECKPOINT_FILE}", flush=True)
    lengths = [len(e.input_ids) for e in examples]
    per_epoch = -(-len(examples) // cfg.batch_size)
    metrics, start = open_metrics(out / METRICS_FILE, state["step"]), time.perf_counter()
    student.train()
    for step in range(state["step"], cfg.steps):
        epoch, pos = divmod(step, per_epoch)
        indices = batch_order(lengths, cfg.batch_size, cfg.seed, epoch, group_by_length=True)[pos]
        batch = batches.collate([examples[i] for i in indices], model.device)
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
        stop = STOP.is_set() and step + 1 < cfg.steps
        if stop or (cfg.save_every and step + 1 < cfg.steps and (step + 1) % cfg.save_every == 0):
            metrics.flush()
            save_checkpoint(out / CHECKPOINT_FILE, params, optimizer, {
                "step": step + 1, "seconds": state["seconds"] + time.perf_counter() - start, **run,
                **rng_state(model.device)})
        if stop:
            metrics.close()
            raise SystemExit(f"distill stopped after step {step + 1}/{cfg.steps}; rerun the same command to continue")
    metrics.close()
    student.eval()
    return state["seconds"] + time.perf_counter() - start


def evaluate_student(model: XLoraModel, student: ScalingHead, examples: list[TokenizedExample],
                     batches: Batches) -> dict[str, float]:
    """KL (at the model's temperature, softmax heads only), MSE and top-1 agreement with the teacher,
    averaged over every real token of ``examples``; the student in eval mode (no dropout). With routing on also
    ``own_top1`` and ``teacher_own_top1``: the share of the records naming one expert that the student (the
    teacher) routes to it (:func:`~xlora.train.distill_losses.own_top1`)."""
    was_training, tau = student.training, model.xlora_config.softmax_temperature
    student.eval()
    sums, tokens, own = {"kl": 0.0, "mse": 0.0, "top1": 0.0}, 0, [0, 0, 0]  # own: student hits, teacher hits, records
    with torch.no_grad():
        for i in range(0, len(examples), batches.size):
            batch = batches.collate(examples[i:i + batches.size], model.device)
            z_t, s_t, x_k = scalings_pair(model, student, batch)
            mask, s_s = batch["attention_mask"], student(x_k)
            n = int(mask.sum())
            if model.xlora_config.enable_softmax:
                sums["kl"] += float(distill_kl(z_t, student.logits(x_k), mask, tau)) * n
            sums["mse"] += float(distill_mse(s_t, s_s, mask)) * n
            sums["top1"] += float(top1_agreement(s_t, s_s, mask)) * n
            tokens += n
            if batches.experts is not None:
                (hits, records), (teacher_hits, _) = own_top1(s_s, batch), own_top1(s_t, batch)
                own = [own[0] + hits, own[1] + teacher_hits, own[2] + records]
    student.train(was_training)
    result = {name: value / max(tokens, 1) for name, value in sums.items()}
    if not model.xlora_config.enable_softmax:
        del result["kl"]
    if own[2]:
        result.update(own_top1=own[0] / own[2], teacher_own_top1=own[1] / own[2], routed_records=own[2])
    return {**result, "tokens": tokens}


def save_student(model: XLoraModel, student: ScalingHead, cfg: DistillConfig, out: Path) -> None:
    """Write ``xlora_config.json`` (``scaling_pass_layers = k``; ``None``, every layer, when ``k = N``) and
    ``xlora_head.safetensors`` to ``out``.

    The experts are referenced as the teacher references them: an absolute path as it is, a relative
    one rewritten relative to ``out`` so that it names the same folder.
    """
    k = None if cfg.scaling_pass_layers == decoder_depth(model) else cfg.scaling_pass_layers
    config = XLoraConfig.from_dict({**student.config.to_dict(), "scaling_pass_layers": k})
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
