"""The evaluation's result: running totals, the ``xlora-eval/1`` JSON, the Markdown tables and the PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlora.analysis.eval_intervals import RESAMPLES, RecordLosses, intervals, ratio_markdown
from xlora.analysis.eval_numeric import numeric_fit, numeric_markdown
from xlora.files import atomic_write, atomic_write_text

FORMAT = "xlora-eval/1"
ORACLE = "oracle"
UNLABELLED = "(unlabelled)"  # the domain of records without a `domain` label


class Totals:
    """Sums the evaluation streams into: NLL and scored tokens per row and domain, X-LoRA's routing."""

    def __init__(self, expert_names: list[str], rows: list[str]) -> None:
        self.names, self.rows = list(expert_names), list(rows)
        self.domains: dict[str, None] = {}  # insertion-ordered set
        self.records = 0
        self.sums: dict[str, dict[str, float]] = {r: {} for r in rows}
        self.tokens: dict[str, dict[str, int]] = {r: {} for r in rows}
        E = len(expert_names)
        self.route: dict[str, torch.Tensor] = {}  # domain -> [E] summed layer-averaged scalings
        self.route_tokens: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.first_hits: dict[str, int] = {}  # top-1 own at the first scored position (the answer's first token)
        self.counts: dict[str, int] = {}
        self.weight = torch.zeros(E, dtype=torch.float64)
        self.entropy, self.scored = 0.0, 0
        self.per_record: list[RecordLosses] = []  # every record's NLL per row, for intervals and eval_records.jsonl

    def _add(self, row: str, domain: str, nll: float, n: int) -> None:
        self.sums[row][domain] = self.sums[row].get(domain, 0.0) + nll
        self.tokens[row][domain] = self.tokens[row].get(domain, 0) + n

    def add_losses(self, chunk: list[Any], losses: dict[str, list[float]], scored: list[int]) -> None:
        """``losses[row][i]``: summed NLL of record ``chunk[i]``; ``scored[i]``: its scored tokens."""
        for i, rec in enumerate(chunk):
            d = rec.domain if rec.domain is not None else UNLABELLED
            self.domains.setdefault(d)  # callers may register them first, in file order
            self.records += 1
            raw_id = rec.raw.get("id") if isinstance(rec.raw, dict) else None
            entry = RecordLosses(rec.where, d, scored[i], record_id=None if raw_id is None else str(raw_id))
            for row in self.rows:
                if row in losses:
                    self._add(row, d, losses[row][i], scored[i])
                    entry.nll[row] = losses[row][i]
            if ORACLE in self.rows and rec.domain in self.names:
                self._add(ORACLE, d, losses[rec.domain][i], scored[i])
                entry.nll[ORACLE] = losses[rec.domain][i]
            self.per_record.append(entry)

    def add_routing(self, chunk: list[Any], scalings: torch.Tensor, target: torch.Tensor,
                    entropy: torch.Tensor) -> None:
        """``scalings`` ``[b, T, L, E]``, ``target``/``entropy`` ``[b, T]``, position t scoring token t+1."""
        s = scalings.mean(2)  # [b, T, E], modules averaged
        entries = self.per_record[-len(chunk):]
        if [e.where for e in entries] != [r.where for r in chunk]:
            raise RuntimeError("add_routing(chunk) must follow add_losses(chunk) of the same records")
        for i, rec in enumerate(chunk):
            m = target[i]
            per_token = s[i][m]  # [n, E]
            top = self.names[int(per_token.mean(0).argmax())] if len(per_token) else None
            entries[i].top1 = top
            self.weight += per_token.sum(0)
            self.entropy += float(entropy[i][m].sum())
            self.scored += int(m.sum())
            if rec.domain is None or not len(per_token):
                continue
            d = rec.domain
            self.route[d] = self.route.get(d, torch.zeros_like(self.weight)) + per_token.sum(0)
            self.route_tokens[d] = self.route_tokens.get(d, 0) + len(per_token)
            self.counts[d] = self.counts.get(d, 0) + 1
            self.hits[d] = self.hits.get(d, 0) + (top == d)
            self.first_hits[d] = self.first_hits.get(d, 0) + (self.names[int(per_token[0].argmax())] == d)

    def result(self, model: str, skipped: dict[str, str], chat: bool, reference: str | None = None,
               resamples: int = RESAMPLES) -> EvalResult:
        """The totals as an :class:`EvalResult`; with ``resamples`` > 0 and a ``reference`` row (X-LoRA), the
        :mod:`~xlora.analysis.eval_intervals` of its loss over every other row's and of the top-1 own shares."""
        doms = list(self.domains)
        configs, notes = {}, []
        for row in self.rows:
            if row == ORACLE:
                missing = [d for d in doms if d not in self.names]
                if len(missing) == len(doms):
                    skipped[ORACLE] = f"no record's domain names an expert (experts: {', '.join(self.names)})"
                    continue
                if missing:
                    notes.append(f"oracle: domains {missing} name no expert; their records are not in the oracle row")
            sums, toks = self.sums[row], self.tokens[row]
            loss = {d: sums[d] / toks[d] for d in doms if toks.get(d)}
            loss["mixed"] = sum(sums.values()) / max(sum(toks.values()), 1)
            configs[row] = {"loss": loss, "tokens": {d: toks[d] for d in doms if d in toks}, "task_score": None}
        routing = None
        if self.route:
            routed = [d for d in doms if d in self.route]  # in file order, not the order batches ran
            routing = {"mean": {d: dict(zip(self.names, (self.route[d] / self.route_tokens[d]).tolist()))
                                for d in routed},
                       "top1_own": {d: self.hits[d] / self.counts[d] for d in routed if d in self.names},
                       "top1_own_first": {d: self.first_hits[d] / self.counts[d] for d in routed if d in self.names}}
        collapse = None
        if self.scored:
            E = len(self.names)
            h = self.entropy / self.scored
            collapse = {"max_expert_share": float(self.weight.max() / self.weight.sum().clamp_min(1e-300)),
                        "mean_entropy": h, "mean_entropy_normalized": h / math.log(E) if E > 1 else 0.0}
        spans = None
        if resamples > 0 and reference in configs:
            spans = intervals(self.per_record, reference, [r for r in self.rows if r in configs],
                              {d: self.hits[d] for d in self.counts if d in self.names},
                              {d: self.counts[d] for d in self.counts if d in self.names}, resamples)
        return EvalResult(model, self.records, doms, configs, routing, collapse, skipped, chat=chat, notes=notes,
                          intervals=spans, per_record=self.per_record)


@dataclass
class EvalResult:
    """What :func:`xlora.analysis.evaluate.evaluate` found; :meth:`to_json` is the ``xlora-eval/1`` schema.

    ``configs[row]``: ``loss`` (nats per scored token, per domain and ``mixed``), ``tokens`` (scored tokens
    per domain), ``task_score`` (None, or the mean check score per domain and ``mixed``; an expert that answered
    only its own domain, ``EvalConfig.expert_answers == "own"``, has no ``mixed``) and, when some
    answered records have numeric checks, ``numeric`` (R² and MAE per task, :mod:`xlora.analysis.eval_numeric`).
    ``intervals`` (or None): X-LoRA's loss over each row's with a paired bootstrap interval, and Wilson intervals
    of the top-1 own shares (:func:`xlora.analysis.eval_intervals.intervals`). Not in the JSON: ``per_record``
    (every record's NLL per row, written to ``eval_records.jsonl``), ``answers`` (each row's generated answers,
    in the order of ``samples``, the raw records answered).
    """

    model: str
    records: int
    domains: list[str]
    configs: dict[str, dict[str, Any]]
    routing: dict[str, Any] | None
    collapse: dict[str, float] | None
    skipped: dict[str, str]
    chat: bool = False
    notes: list[str] = field(default_factory=list)
    intervals: dict[str, Any] | None = None
    per_record: list[RecordLosses] = field(default_factory=list)
    bad_records: list[str] = field(default_factory=list)
    answers: dict[str, list[str | None]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "records": self.records, "domains": list(self.domains),
                "configs": self.configs, "routing": self.routing, "collapse": self.collapse,
                "skipped": dict(self.skipped), "intervals": self.intervals}

    def set_task_scores(self, samples: list[Any], checker: Callable[[dict[str, Any], str], float]) -> None:
        """Score every row's answers to ``samples`` with ``checker(raw record, answer)``."""
        for row, answers in self.answers.items():
            if row not in self.configs:
                continue
            by_domain: dict[str, list[float]] = {}
            for rec, answer in zip(samples, answers):
                if answer is not None:
                    d = rec.domain if rec.domain is not None else UNLABELLED
                    by_domain.setdefault(d, []).append(float(checker(rec.raw, answer)))
            every = [v for vs in by_domain.values() for v in vs]
            score = {d: sum(v) / len(v) for d, v in by_domain.items()}
            score["mixed"] = sum(every) / len(every) if every else 0.0
            self.configs[row]["task_score"] = score
            fits = numeric_fit([rec.raw for rec in samples], answers)
            if fits:
                self.configs[row]["numeric"] = fits

    def to_markdown(self) -> str:
        cols = [*[d for d in self.domains], "mixed"]
        out = [f"`{self.model}` on {self.records} records ({'chat' if self.chat else 'plain'} rendering); "
               f"scored tokens: " + ", ".join(f"{d} {n}" for d, n in self._tokens().items()) + "\n\n"]
        out += ["Loss (mean NLL per scored token, nats; lower is better):\n\n",
                _table(self.configs, "loss", cols, min), ratio_markdown(self.intervals, cols)]
        if any(c["task_score"] for c in self.configs.values()):
            out += ["\nTask score (share of generated answers that pass their check; higher is better):\n\n",
                    _table(self.configs, "task_score", cols, max), numeric_markdown(self.configs)]
        if self.routing:
            experts = list(next(iter(self.routing["mean"].values())))
            out += ["\nX-LoRA routing (mean scalings over scored positions, modules averaged; top-1 own: share of "
                    "the domain's records whose largest mean scaling is its own expert"
                    + (f", with its {self.intervals['level']:.0%} Wilson interval" if self.intervals else "")
                    + "; first position: the same share by the scalings at the first scored position alone, the one "
                    "that predicts an answer's first token):\n\n",
                    "| domain | " + " | ".join(experts) + " | top-1 own | first position |\n|---|"
                    + "---:|" * (len(experts) + 2) + "\n"]
            wilson = self.intervals["top1_own"] if self.intervals else {}
            for d, row in self.routing["mean"].items():
                own, first = self.routing["top1_own"].get(d), self.routing["top1_own_first"].get(d)
                span = f" [{wilson[d][0]:.2f}, {wilson[d][1]:.2f}]" if d in wilson else ""
                out.append(f"| {d} | " + " | ".join(f"{v:.3f}" for v in row.values())
                           + f" | {'' if own is None else f'{own:.3f}'}{span} | {'' if first is None else f'{first:.3f}'} |\n")
        if self.collapse:
            c = self.collapse
            out.append(f"\nCollapse: largest expert's share of the weight {c['max_expert_share']:.3f}; mean per-token "
                       f"entropy {c['mean_entropy']:.3f} nats ({c['mean_entropy_normalized']:.3f} of ln E)\n")
        out += [f"\nSkipped {row}: {why}\n" for row, why in self.skipped.items()]
        out += [f"\nNote: {n}\n" for n in self.notes]
        if self.bad_records:
            out.append(f"\n{len(self.bad_records)} bad records skipped (first: {self.bad_records[0]})\n")
        return "".join(out)

    def _tokens(self) -> dict[str, int]:
        for row in self.configs.values():
            if row["tokens"] and set(row["tokens"]) == set(self.domains):
                return row["tokens"]
        return {}

    def write(self, out_dir: str | Path, png: bool = True) -> list[Path]:
        """``eval.md``, ``eval.json``, ``eval_records.jsonl`` (every record's NLL per row, for pairing runs on the
        same data) and (with matplotlib) ``eval.png`` in ``out_dir``, atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.md", self.to_markdown())
        atomic_write_text(out / "eval.json", json.dumps(self.to_json(), indent=2) + "\n")
        atomic_write_text(out / "eval_records.jsonl", "".join(json.dumps(r.to_json()) + "\n" for r in self.per_record))
        paths = [out / "eval.md", out / "eval.json", out / "eval_records.jsonl"]
        if png:
            paths.append(self.plot(out / "eval.png"))
        return paths

    def plot(self, path: Path) -> Path:
        """Grouped bars of the loss per row and domain and, with routing, the domain x expert matrix."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("the evaluation plot needs matplotlib: pip install 'xlora[viz]'") from None
        cols, rows = [*self.domains, "mixed"], list(self.configs)
        fig = Figure(figsize=(11 if self.routing else 7, 4.5), dpi=100, layout="constrained")  # room for titles
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 2 if self.routing else 1, 1)
        width = 0.8 / max(len(rows), 1)
        for j, row in enumerate(rows):
            loss = self.configs[row]["loss"]
            ax.bar([i + j * width for i in range(len(cols))], [loss.get(d, float("nan")) for d in cols], width,
                   label=row)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))], cols, rotation=30, ha="right")
        ax.set_ylabel("loss (nats / scored token)")
        ax.legend(fontsize=7, ncol=2)
        if self.routing:
            mean = self.routing["mean"]
            experts = list(next(iter(mean.values())))
            hm = fig.add_subplot(1, 2, 2)
            image = hm.imshow([[mean[d][e] for e in experts] for d in mean], cmap="viridis", vmin=0)
            hm.set_xticks(range(len(experts)), experts, rotation=30, ha="right")
            hm.set_yticks(range(len(mean)), list(mean))
            hm.set_title("X-LoRA mean scalings")
            hm.set_xlabel("expert")
            hm.set_ylabel("domain of the records")
            fig.colorbar(image, ax=hm)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        return path


def _table(configs: dict[str, dict[str, Any]], key: str, cols: list[str], best: Callable) -> str:
    head = "| row | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    lines = []
    for row, c in configs.items():
        values = c[key] or {}
        cells = []
        for d in cols:
            ref = [o[key][d] for o in configs.values() if o[key] and d in o[key]]
            v = values.get(d)
            text = "" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if v is not None and v == best(ref) and len(set(ref)) > 1 else text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
