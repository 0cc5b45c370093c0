"""Evaluating X-LoRA against its parts on the demo domains: completion losses, task scores, routing.

Every configuration is the same :class:`~xlora.model.XLoraModel` with other scalings: ``"zero"`` is
the base model, an expert's name is that expert alone, ``"uniform"`` is ``1/E`` each, and ``None`` is
X-LoRA (the trained head). Records are formatted as chat turns (a short system prompt, the user's
prompt, the assistant's completion) exactly as the training data is; the loss is the mean
cross-entropy over the completion tokens (the assistant turn and its end-of-turn markup).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xlora.demo import domains
from xlora.files import atomic_write_text
from xlora.generation import StepRecorder, pad_token_id
from xlora.train.data import IGNORE_INDEX, TokenizedExample, collate, tokenize_record

SYSTEM = "Answer with the result only."
BASE, UNIFORM, XLORA = "base", "uniform", "xlora"


def chat_messages(record: dict[str, Any], system: str | None = SYSTEM, answer: bool = True) -> list[dict[str, str]]:
    """A domain record as chat messages: optional system prompt, the user prompt, the assistant answer."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": record["prompt"]})
    if answer:
        messages.append({"role": "assistant", "content": record["completion"]})
    return messages


def tokenize(records: list[dict[str, Any]], tokenizer: Any, max_length: int = 256) -> list[TokenizedExample]:
    """Chat-formatted examples with loss on the assistant turn only (as :mod:`xlora.train.data` trains)."""
    return [tokenize_record({"messages": chat_messages(r)}, tokenizer, max_length, i)[0] for i, r in enumerate(records)]


def left_padded(examples: list[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Left-pad a batch so that every sequence ends at the last column.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (counting real tokens only) and
    ``labels``, all ``[b, T]``, and ``keep``: the trailing positions whose logits are needed (from
    just before the earliest loss token to the end), so that the LM head runs on those only.
    """
    batch = collate(examples, pad_id, side="left")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    T = ids.shape[1]
    has_loss = (labels != IGNORE_INDEX).any(1)
    first = int((labels != IGNORE_INDEX).float().argmax(1)[has_loss].min()) if has_loss.any() else T - 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
            "keep": T - max(first, 1) + 1}


def completion_loss(model: Any, batch: dict[str, Any], reduction: str = "mean",
                    **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Cross-entropy of the loss tokens of a :func:`left_padded` batch, and the model output.

    ``reduction``: ``"mean"`` over all loss tokens, ``"sum"``, or ``"none"`` (per-sequence sums ``[b]``).
    """
    keep = batch["keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep, **kwargs)
    logits = out.logits[:, :-1].float()  # [b, keep-1, V]: predictions of the last keep-1 tokens
    labels = batch["labels"][:, -(keep - 1):]  # [b, keep-1]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view(labels.shape)
    if reduction == "none":
        return ce.sum(1), out
    total = ce.sum()
    return (total if reduction == "sum" else total / (labels != IGNORE_INDEX).sum().clamp_min(1)), out


@dataclass
class EvalTable:
    """Per configuration (``base``, each expert, ``uniform``, ``xlora``) and domain (plus ``mixed``):

    ``loss`` (mean completion cross-entropy, nats/token), ``score`` (mean task score of greedy
    answers on a sample), and for X-LoRA ``routing``: mean layer-averaged scalings per expert over
    the positions that predict completion tokens. ``tokens`` counts loss tokens per domain.
    """

    split: str
    n_per_domain: int
    n_generate: int
    domains: list[str]
    configs: list[str]
    loss: dict[str, dict[str, float]] = field(default_factory=dict)
    score: dict[str, dict[str, float]] = field(default_factory=dict)
    routing: dict[str, dict[str, float]] = field(default_factory=dict)
    routing_top1: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def targets(self) -> list[tuple[str, float, float, bool]]:
        """Issue 15's targets as ``(what, value, bound, met)``: own-expert top-1 routing >= 0.8 in every
        domain, X-LoRA's mixed loss <= 0.9 x the uniform mixture's and below every single expert's."""
        rows = [(f"top-1 routing {d}", v, 0.8, v >= 0.8) for d, v in self.routing_top1.items()]
        if XLORA in self.loss and UNIFORM in self.loss:
            x, u = self.loss[XLORA]["mixed"], self.loss[UNIFORM]["mixed"]
            rows.append(("mixed loss / uniform's", x / u, 0.9, x / u <= 0.9))
            singles = [c for c in self.configs if c not in (BASE, UNIFORM, XLORA) and c in self.loss]
            if singles:
                best = min(self.loss[c]["mixed"] for c in singles)
                rows.append(("mixed loss - best single expert's", x - best, 0.0, x < best))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        cols = [*self.domains, "mixed"]
        head = "| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"

        def table(values: dict[str, dict[str, float]], best: Any) -> str:
            rows = []
            for c in self.configs:
                if c not in values:
                    continue
                cells = []
                for d in cols:
                    v = values[c].get(d)
                    ref = [values[k][d] for k in values if values[k].get(d) is not None]
                    text = "" if v is None else f"{v:.3f}"
                    winner = v is not None and v == best(ref) and len(set(ref)) > 1  # no bold when all tie
                    cells.append(f"**{text}**" if winner else text)
                rows.append(f"| {c} | " + " | ".join(cells) + " |")
            return head + "\n".join(rows) + "\n"

        out = [f"Split `{self.split}`: {self.n_per_domain} records per domain "
               f"({', '.join(f'{d} {self.tokens.get(d, 0)}' for d in self.domains)} completion tokens).\n",
               "Completion loss (nats/token, lower is better):\n", table(self.loss, min)]
        if self.score:
            out += [f"\nTask score of greedy answers ({self.n_generate} per domain; 0..1, higher is better):\n",
                    table(self.score, max)]
        if self.routing:
            experts = [c for c in self.configs if c not in (BASE, UNIFORM, XLORA)]
            out += ["\nX-LoRA routing (mean scalings over completion positions, layers averaged):\n",
                    "| domain | " + " | ".join(experts) + " |\n|---|" + "---:|" * len(experts) + "\n"]
            out += [f"| {d} | " + " | ".join(f"{self.routing[d][e]:.3f}" for e in experts) + " |\n"
                    for d in self.routing]
        if self.routing_top1:
            out += ["\nTop-1 own-expert routing (fraction of records whose largest mean scaling is their domain's expert):\n",
                    "| " + " | ".join(self.routing_top1) + " |\n|" + "---:|" * len(self.routing_top1) + "\n",
                    "| " + " | ".join(f"{v:.3f}" for v in self.routing_top1.values()) + " |\n"]
        if self.targets():
            out += ["\nTargets (issue 15):\n"] + [f"- {what}: {value:.3f} (bound {bound:g}) — {'met' if ok else 'MISSED'}\n"
                                                for what, value, bound, ok in self.targets()]
        return "".join(out)

    def write(self, out_dir: str | os.PathLike, stem: str = "eval") -> tuple[Path, Path]:
        out = Path(out_dir)
        md, js = out / f"{stem}.md", out / f"{stem}.json"
        atomic_write_text(md, self.to_markdown())
        atomic_write_text(js, json.dumps(self.to_dict(), indent=2) + "\n")
        return md, js


def _spec(config: str) -> str | None:
    return None if config == XLORA else ("zero" if config == BASE else config)


@torch.no_grad()
def losses(model: Any, tokenizer: Any, records: list[dict[str, Any]], configs: list[str], batch_size: int = 8
           ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int]]:
    """``(loss[config][domain], routing[domain][expert], tokens[domain])`` over ``records``."""
    loss, routing, tokens, _ = loss_pass(model, tokenizer, records, configs, batch_size)
    return loss, routing, tokens


def _domains_in_order(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["domain"] for r in records))


@torch.no_grad()
def loss_pass(model: Any, tokenizer: Any, records: list[dict[str, Any]], configs: list[str], batch_size: int = 8
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int], dict[str, float]]:
    """:func:`losses` plus ``top1[domain]``: the fraction of the domain's records whose expert of largest
    mean scaling (over the positions predicting completion tokens, layers averaged) is the expert named
    like the domain (with X-LoRA among ``configs``; else empty)."""
    pad = pad_token_id(tokenizer)
    doms = _domains_in_order(records)
    names = model.xlora_config.expert_names
    sums = {c: {d: 0.0 for d in doms} for c in configs}
    tokens = {d: 0 for d in doms}
    route = {d: torch.zeros(len(names), dtype=torch.float64) for d in doms}
    hits = {d: 0 for d in doms}
    for d in doms:
        examples = tokenize([r for r in records if r["domain"] == d], tokenizer)
        for i in range(0, len(examples), batch_size):
            batch = left_padded(examples[i:i + batch_size], pad)
            target = batch["labels"][:, 1:] != IGNORE_INDEX  # [b, T-1]: position t predicts token t+1
            tokens[d] += int(target.sum())
            for c in configs:
                loss, out = completion_loss(model, batch, "sum", scalings=_spec(c))
                sums[c][d] += float(loss)
                if c == XLORA:
                    s = out.scalings[:, :-1].double().mean(2)  # [b, T-1, E], layers averaged
                    route[d] += s[target].sum(0)
                    per_record = (s * target[..., None]).sum(1) / target.sum(1, keepdim=True).clamp_min(1)  # [b, E]
                    hits[d] += sum(names[int(j)] == d for j in per_record.argmax(1))
    loss = {c: {d: sums[c][d] / max(tokens[d], 1) for d in doms} for c in configs}
    for c in configs:
        loss[c]["mixed"] = sum(sums[c].values()) / max(sum(tokens.values()), 1)
    if XLORA not in configs:
        return loss, {}, tokens, {}
    counts = {d: sum(r["domain"] == d for r in records) for d in doms}
    routing = {d: dict(zip(names, (route[d] / max(tokens[d], 1)).tolist())) for d in doms}
    return loss, routing, tokens, {d: hits[d] / max(counts[d], 1) for d in doms}


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, records: list[dict[str, Any]], config: str = XLORA,
                     max_new_tokens: int = 32, batch_size: int = 16, record_scalings: bool = False
                     ) -> tuple[list[str], list[list[int]], list[torch.Tensor]]:
    """Greedy answers of one configuration, left-padded in batches.

    Returns ``(texts, new_token_ids, scalings)``; with ``record_scalings`` (X-LoRA), ``scalings[i]``
    is ``[n_new_i, L, E]``: for each generated token, the scalings of the step that predicted it.
    """
    pad = pad_token_id(tokenizer)
    texts, all_ids, all_s = [], [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [tokenizer.apply_chat_template(chat_messages(r, answer=False), tokenize=False,
                                                 add_generation_prompt=True) for r in chunk]
        examples = [TokenizedExample(ids, ids) for ids in
                    (tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts)]
        batch = left_padded(examples, pad)
        recorder = StepRecorder() if record_scalings else None
        with model.fixed_scalings(_spec(config)):
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, observer=recorder)
        for row in range(len(chunk)):
            new = out[row, batch["input_ids"].shape[1]:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            all_ids.append(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
            if recorder is not None:
                all_s.append(recorder.per_token(len(new), row))
    return texts, all_ids, all_s


GRAPH_NEW_TOKENS = 96  # a passage's triples run to ~40 tokens, some to 80


def _answers(model: Any, tokenizer: Any, records: list[dict[str, Any]], config: str, max_new_tokens: int) -> list[str]:
    """Greedy answers in the records' order; graph records get :data:`GRAPH_NEW_TOKENS` tokens at least."""
    texts: dict[int, str] = {}
    for is_graph in (False, True):
        idx = [i for i, r in enumerate(records) if (r["domain"] == "graph") == is_graph]
        budget = max(max_new_tokens, GRAPH_NEW_TOKENS) if is_graph else max_new_tokens
        if idx:
            texts.update(zip(idx, generate_answers(model, tokenizer, [records[i] for i in idx], config, budget)[0]))
    return [texts[i] for i in range(len(records))]


def evaluate(model: Any, tokenizer: Any, split: str = "test", n_per_domain: int = 32, n_generate: int = 8,
             seed: int = 0, domain_names: list[str] | None = None, configs: list[str] | None = None,
             max_new_tokens: int = 32, batch_size: int = 8, progress: Any = None) -> EvalTable:
    """Losses of every configuration on ``n_per_domain`` records per domain, task scores of greedy
    answers on the first ``n_generate`` of them, and X-LoRA's routing (see :class:`EvalTable`)."""
    doms = list(domain_names or domains.DOMAINS)
    experts = model.xlora_config.expert_names
    configs = configs or [BASE, *experts, UNIFORM, XLORA]
    records = domains.generate_mixture(split, n_per_domain, seed=seed, domains=doms)
    table = EvalTable(split, n_per_domain, n_generate, doms, configs)
    say = progress or (lambda msg: None)
    say(f"losses of {len(configs)} configurations on {len(records)} records")
    table.loss, table.routing, table.tokens, table.routing_top1 = loss_pass(model, tokenizer, records, configs,
                                                                             batch_size)
    if n_generate > 0:
        sample = [r for d in doms for r in [x for x in records if x["domain"] == d][:n_generate]]
        for c in configs:
            say(f"greedy answers of {c} on {len(sample)} prompts")
            answers = _answers(model, tokenizer, sample, c, max_new_tokens)
            scores = [domains.check(r, a) for r, a in zip(sample, answers)]
            table.score[c] = {d: sum(s for r, s in zip(sample, scores) if r["domain"] == d) /
                                 max(1, sum(r["domain"] == d for r in sample)) for d in doms}
            table.score[c]["mixed"] = sum(scores) / len(scores)
            table.samples += [{"config": c, "id": r["id"], "prompt": r["prompt"], "expected": r["completion"],
                               "answer": a, "score": s} for r, a, s in zip(sample, answers, scores)]
    return table
