"""Evaluating X-LoRA against its parts on the demo domains: completion losses, task scores, routing.

The numbers come from the library's evaluation engine (:mod:`xlora.analysis.evaluate`); the demo adds
only its data (records of :mod:`xlora.demo.domains` as chat turns: a short system prompt, the user's
prompt, the assistant's completion, exactly as the training data is; or records given in that shape, such as
the science suite's), its answer checker (:func:`xlora.demo.domains.check` unless another is given) and its
answer budgets (graph triples and long reference answers get more tokens). Every
configuration is the same :class:`~xlora.model.XLoraModel` with other scalings: ``"zero"`` is the base
model, an expert's name is that expert alone, ``"uniform"`` is ``1/E`` each, and ``None`` is X-LoRA;
the engine adds ``oracle`` and PEFT's ``arrow`` when asked. The loss is the mean cross-entropy over the
completion tokens (the assistant turn and its end-of-turn markup).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlora.analysis.eval_data import EvalRecord, completion_loss, left_padded, make_record
from xlora.analysis.eval_report import ORACLE
from xlora.analysis.evaluate import ARROW, EvalConfig, EvalResult, context_length, fixed_rows
from xlora.analysis.evaluate import evaluate as evaluate_records
from xlora.demo import domains
from xlora.files import atomic_write_text
from xlora.generation import StepRecorder, pad_token_id
from xlora.train.data import TokenizedExample, tokenize_record

__all__ = ["BASE", "UNIFORM", "XLORA", "EvalTable", "chat_messages", "completion_loss", "demo_records", "evaluate",
           "generate_answers", "left_padded", "loss_pass", "losses", "tokenize", "write_records"]
SYSTEM = "Answer with the result only."
BASE, UNIFORM, XLORA = "base", "uniform", "xlora"
NOT_SINGLE = (BASE, UNIFORM, XLORA, ORACLE, ARROW)  # the rows that are not one expert alone


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
    routing_top1_first: dict[str, float] = field(default_factory=dict)  # the same at the first answer position
    tokens: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    intervals: dict[str, Any] | None = None  # the engine's (xlora.analysis.eval_intervals), when X-LoRA ran

    def targets(self) -> list[tuple[str, float, float, bool]]:
        """The science suite's targets as ``(what, value, bound, met)``: own-expert top-1 routing >= 0.8 in every
        domain; X-LoRA's mixed loss <= 0.85 x the uniform mixture's, <= the oracle's (when there is an oracle
        row) and below every single expert's."""
        return [t[:4] for t in self._targets()]

    def _targets(self) -> list[tuple[str, float, float, bool, str]]:
        """:meth:`targets`, each with its interval as text (``" [low, high]"`` from ``intervals``, else ``""``)."""
        spans = self.intervals or {"top1_own": {}, "loss_ratio": {}}
        wilson = spans["top1_own"]
        rows = [(f"top-1 routing {d}", v, 0.8, v >= 0.8, f" [{wilson[d][0]:.2f}, {wilson[d][1]:.2f}]" if d in wilson
                 else "") for d, v in self.routing_top1.items()]

        def ratio_span(row: str) -> str:
            cells = spans["loss_ratio"].get(row, {}).get("mixed")
            return f" [{cells[1]:.3f}, {cells[2]:.3f}]" if cells else ""

        if XLORA in self.loss and UNIFORM in self.loss:
            x, u = self.loss[XLORA]["mixed"], self.loss[UNIFORM]["mixed"]
            rows.append(("mixed loss / uniform's", x / u, 0.85, x / u <= 0.85, ratio_span(UNIFORM)))
            if ORACLE in self.loss:
                o = self.loss[ORACLE]["mixed"]
                rows.append(("mixed loss / oracle's", x / o, 1.0, x / o <= 1.0, ratio_span(ORACLE)))
            singles = [c for c in self.configs if c not in NOT_SINGLE and c in self.loss]
            if singles:
                best = min(self.loss[c]["mixed"] for c in singles)
                rows.append(("mixed loss - best single expert's", x - best, 0.0, x < best, ""))
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
            experts = list(next(iter(self.routing.values())))
            out += ["\nX-LoRA routing (mean scalings over completion positions, layers averaged):\n",
                    "| domain | " + " | ".join(experts) + " |\n|---|" + "---:|" * len(experts) + "\n"]
            out += [f"| {d} | " + " | ".join(f"{self.routing[d][e]:.3f}" for e in experts) + " |\n"
                    for d in self.routing]
        if self.routing_top1:
            first = self.routing_top1_first
            out += ["\nTop-1 own-expert routing (fraction of records whose largest scaling is their domain's expert; by "
                    "the mean over the answer, and at the first answer position alone):\n",
                    "| | " + " | ".join(self.routing_top1) + " |\n|---|" + "---:|" * len(self.routing_top1) + "\n",
                    "| mean | " + " | ".join(f"{v:.3f}" for v in self.routing_top1.values()) + " |\n"]
            out += ["| first position | " + " | ".join(f"{first[d]:.3f}" for d in self.routing_top1) + " |\n"] \
                if first else []
        if targets := self._targets():
            out += ["\nTargets (95 % intervals: Wilson for routing, paired bootstrap over records for loss ratios):\n"]
            out += [f"- {what}: {value:.3f}{span} (bound {bound:g}) — {'met' if ok else 'MISSED'}\n"
                    for what, value, bound, ok, span in targets]
        return "".join(out)

    def write(self, out_dir: str | os.PathLike, stem: str = "eval") -> tuple[Path, Path]:
        out = Path(out_dir)
        md, js = out / f"{stem}.md", out / f"{stem}.json"
        atomic_write_text(md, self.to_markdown())
        atomic_write_text(js, json.dumps(self.to_dict(), indent=2) + "\n")
        return md, js


def demo_records(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[EvalRecord]:
    """The engine's records for demo records: the chat turns scored on the assistant turn; ``raw`` stays the
    demo record (its checker reads ``meta``)."""
    out = []
    for r in records:
        chat = {"messages": chat_messages(r), "domain": r["domain"]}
        rec = make_record(chat, f"{r['domain']} record {r.get('id', '?')}", tokenizer, chat=True, max_length=max_length,
                          tokenize_record=tokenize_record)
        out.append(dataclasses.replace(rec, raw=r))
    return out


def _answer_budget(max_new_tokens: int) -> Any:
    """``max_new_tokens``, or :data:`GRAPH_NEW_TOKENS` for graph records and any record whose reference answer
    (with its end of turn) does not fit in ``max_new_tokens`` (a SMILES, a long sequence)."""
    def budget(rec: EvalRecord) -> int:
        long = rec.domain == "graph" or len(rec.example.input_ids) - len(rec.prompt_ids) > max_new_tokens
        return max(max_new_tokens, GRAPH_NEW_TOKENS) if long else max_new_tokens
    return budget


def run_engine(model: Any, tokenizer: Any, records: list[dict[str, Any]], configs: list[str], batch_size: int = 8,
               n_generate: int = 0, max_new_tokens: int = 32, arrow_base: Any = None, checker: Any = None,
               expert_answers: str = "all") -> EvalResult:
    """The engine's :func:`~xlora.analysis.evaluate.evaluate` on demo records, scored by ``checker`` (default the
    demo's, :func:`xlora.demo.domains.check`; ``arrow_base``: a loader of a fresh base model, for an ``"arrow"``
    row; ``expert_answers``: see :class:`~xlora.analysis.evaluate.EvalConfig`)."""
    config = EvalConfig(chat=True, batch_size=batch_size, generate=n_generate, max_new_tokens=max_new_tokens,
                        expert_answers=expert_answers)
    return evaluate_records(model, tokenizer, demo_records(records, tokenizer, context_length(model)), config,
                            rows=configs, checker=checker or domains.check,
                            max_new_tokens=_answer_budget(max_new_tokens), arrow_base=arrow_base, progress=False)


def losses(model: Any, tokenizer: Any, records: list[dict[str, Any]], configs: list[str], batch_size: int = 8
           ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int]]:
    """``(loss[config][domain], routing[domain][expert], tokens[domain])`` over ``records``."""
    loss, routing, tokens, _ = loss_pass(model, tokenizer, records, configs, batch_size)
    return loss, routing, tokens


def _from_result(result: EvalResult, configs: list[str]
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int], dict[str, float]]:
    loss = {c: result.configs[c]["loss"] for c in configs if c in result.configs}
    tokens = next(iter(result.configs.values()))["tokens"]
    if result.routing is None:
        return loss, {}, tokens, {}
    return loss, result.routing["mean"], tokens, result.routing["top1_own"]


def loss_pass(model: Any, tokenizer: Any, records: list[dict[str, Any]], configs: list[str], batch_size: int = 8
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int], dict[str, float]]:
    """:func:`losses` plus ``top1[domain]``: the fraction of the domain's records whose expert of largest
    mean scaling (over the positions predicting completion tokens, layers averaged) is the expert named
    like the domain (with X-LoRA among ``configs``; else empty). Computed by the evaluation engine."""
    return _from_result(run_engine(model, tokenizer, records, configs, batch_size), configs)


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
        with model.fixed_scalings(fixed_rows(model)[config]):
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


def evaluate(model: Any, tokenizer: Any, split: str = "test", n_per_domain: int = 32, n_generate: int = 8,
             seed: int = 0, domain_names: list[str] | None = None, configs: list[str] | None = None,
             max_new_tokens: int = 32, batch_size: int = 8, progress: Any = None, arrow_base: Any = None, *,
             records: list[dict[str, Any]] | None = None, checker: Any = None,
             expert_answers: str = "all") -> EvalTable:
    """Losses of every configuration on ``n_per_domain`` records per domain, task scores of greedy
    answers on the first ``n_generate`` of them, and X-LoRA's routing (see :class:`EvalTable`), all from
    the evaluation engine. ``configs`` may add the engine's ``"oracle"`` and ``"arrow"`` rows (the latter
    needs ``arrow_base``, a loader of a fresh base model; without it the row is left out).

    ``records`` (with ``checker``, default :func:`xlora.demo.domains.check`): other records of the same shape
    (``id``, ``domain``, ``prompt``, ``completion``), e.g. the science suite's, instead of the five domains'
    ``split``; ``expert_answers="own"``: each expert answers only its own domain's records."""
    check = checker or domains.check
    if records is None:
        records = domains.generate_mixture(split, n_per_domain, seed=seed, domains=list(domain_names or domains.DOMAINS))
    doms = list(dict.fromkeys(r["domain"] for r in records))
    experts = model.xlora_config.expert_names
    configs = configs or [BASE, *experts, UNIFORM, XLORA]
    table = EvalTable(split, n_per_domain, n_generate, doms, configs)
    say = progress or (lambda msg: None)
    say(f"losses of {len(configs)} configurations on {len(records)} records"
        + (f", greedy answers to {n_generate} per domain" if n_generate else ""))
    result = run_engine(model, tokenizer, records, configs, batch_size, n_generate, max_new_tokens, arrow_base,
                        check, expert_answers)
    table.configs = [c for c in configs if c in result.configs]
    table.loss, table.routing, table.tokens, table.routing_top1 = _from_result(result, configs)
    table.routing_top1_first = result.routing["top1_own_first"] if result.routing else {}
    table.intervals = result.intervals
    for c in configs if n_generate > 0 else []:
        if result.configs.get(c, {}).get("task_score"):
            table.score[c] = result.configs[c]["task_score"]
        table.samples += [{"config": c, "id": r["id"], "prompt": r["prompt"], "expected": r["completion"],
                           "answer": a, "score": check(r, a)}
                          for r, a in zip(result.samples, result.answers.get(c, [])) if a is not None]
    return table


def write_records(path: str | os.PathLike, split: str = "test_unseen", n_per_domain: int = 32, seed: int = 0,
                  domain_names: list[str] | None = None) -> Path:
    """The demo's held-out records as a JSONL file for ``xlora eval MODEL_DIR --data FILE``: each a
    ``messages`` record (the demo's system prompt, prompt, completion) with its ``domain``."""
    records = domains.generate_mixture(split, n_per_domain, seed=seed, domains=list(domain_names or domains.DOMAINS))
    lines = [json.dumps({"messages": chat_messages(r), "domain": r["domain"]}) for r in records]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)
