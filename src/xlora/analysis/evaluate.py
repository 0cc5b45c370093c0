"""Does the mixture help on my data? One evaluation engine for ``xlora eval``, the demo and Python users.

Every row is the same :class:`~xlora.model.XLoraModel` with other scalings, except ``arrow``:

- ``base``: scalings all zero (exactly the base model); ``<expert>``: that expert alone at 1;
  ``uniform``: ``1/E`` each; ``xlora``: the trained scaling head.
- ``oracle``: each record scored by its own domain's expert (records whose ``domain`` names an expert);
  no extra forward: it reads the expert rows' per-record losses.
- ``arrow``: PEFT's training-free Arrow router (``peft.create_arrow_model``) over the same expert
  folders on a second copy of the base model; skipped, with the reason, when PEFT refuses the experts.

Loss (see :mod:`xlora.analysis.eval_data` for the scored tokens): ``Σ NLL / Σ scored tokens`` per domain
and over all records (``mixed``), i.e. token-weighted. Routing, over the positions that predict scored
tokens of X-LoRA's forward: mean scalings per domain (modules averaged), ``top1_own`` (the share of a
domain's records whose largest mean scaling is the expert named like the domain) and collapse
diagnostics over all scored tokens (the largest expert's share of the total weight; the mean per-token
entropy ``-Σ_e s_e ln s_e``, averaged over modules, and that divided by ``ln E``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlora.analysis.eval_answers import ARROW, Checker, task_scores
from xlora.analysis.eval_data import (
    IGNORE_INDEX,
    EvalRecord,
    ReadRecords,
    TokenizeRecord,
    check_answer,
    check_data_file,
    completion_loss,
    iter_eval_records,
    left_padded,
)
from xlora.analysis.eval_intervals import RESAMPLES
from xlora.analysis.eval_report import ORACLE, UNLABELLED, EvalResult, Totals
from xlora.analysis.stats import token_entropy
from xlora.generation import pad_token_id

BASE, UNIFORM, XLORA = "base", "uniform", "xlora"
EXPERT_ANSWERS = ("all", "own")
WINDOW = 16  # batches read ahead and sorted by length, so that a batch pads little


@dataclass
class EvalConfig:
    """Options of :func:`evaluate` (and the flags of ``xlora eval``).

    Attributes:
        chat: render ``prompt``/``completion`` records as a user/assistant chat (None: when the tokenizer
            has a chat template). ``messages`` always use the template; ``text`` never.
        arrow_top_k: experts Arrow mixes per token (PEFT's ``ArrowConfig.top_k``; capped at E).
        generate: greedy answers per domain scored by the checks (0: no task score).
        max_new_tokens: tokens per generated answer.
        max_records: read at most this many records (None: all).
        batch_size: records per forward (left-padded).
        answer_batch_size: prompts answered together (default ``2 × batch_size``): a decoding step's cost grows
            little with the batch, so answers pay for fewer, larger batches; the prompts' forward is the same work.
        skip_bad: leave out bad records (and count them) instead of stopping at the first.
        expert_answers: ``"all"``: every expert answers every sampled record; ``"own"``: each expert answers
            only its own domain's records (``E`` times fewer expert answers; the oracle row is unchanged and the
            expert rows get no ``mixed`` task score).
        resamples: bootstrap resamples of the intervals of X-LoRA's loss over every other row's
            (:mod:`~xlora.analysis.eval_intervals`; 0: no intervals).
    """

    chat: bool | None = None
    arrow_top_k: int = 3
    generate: int = 0
    max_new_tokens: int = 64
    max_records: int | None = None
    batch_size: int = 8
    answer_batch_size: int | None = None
    skip_bad: bool = False
    expert_answers: str = "all"
    resamples: int = RESAMPLES

    def __post_init__(self) -> None:
        for name, low in (("arrow_top_k", 1), ("generate", 0), ("max_new_tokens", 1), ("batch_size", 1),
                          ("resamples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EvalConfig.{name} must be an integer >= {low}, got {value!r}")
        for name, none in (("answer_batch_size", "2 x batch_size"), ("max_records", "all")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EvalConfig.{name} must be a positive integer or None ({none}), got {value!r}")
        if self.chat not in (None, True, False) or self.skip_bad not in (True, False):
            raise ValueError(f"EvalConfig.chat must be True, False or None and skip_bad a boolean, "
                             f"got chat={self.chat!r}, skip_bad={self.skip_bad!r}")
        if self.expert_answers not in EXPERT_ANSWERS:
            raise ValueError(f"EvalConfig.expert_answers must be one of {EXPERT_ANSWERS}, got {self.expert_answers!r}: "
                             "'own' has each expert answer only its own domain's records")


def context_length(model: Any) -> int:
    """The most tokens a record may have: the base config's ``max_position_embeddings`` (or ``n_positions``)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def use_chat(config: EvalConfig, tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if config.chat is None else config.chat


def evaluate_files(model: Any, tokenizer: Any, paths: list[str | Path], config: EvalConfig | None = None, *,
                   tokenize_record: TokenizeRecord, read_records: ReadRecords | None = None,
                   **kwargs: Any) -> EvalResult:
    """:func:`evaluate` on the records of data files (JSONL streamed), parsed by the trainer's functions:
    ``tokenize_record=xlora.train.data.tokenize_record`` and, for other formats than JSONL,
    ``read_records=xlora.train.records.iter_records`` (handed in: analysis never imports train)."""
    config = config or EvalConfig()
    bad: list[str] = []
    records = iter_eval_records(paths, tokenizer, chat=use_chat(config, tokenizer), max_length=context_length(model),
                                tokenize_record=tokenize_record, read_records=read_records,
                                skip_bad=config.skip_bad, max_records=config.max_records, skipped=bad)
    result = evaluate(model, tokenizer, records, config, **kwargs)
    result.bad_records = bad
    return result


def fixed_rows(model: Any) -> dict[str, Any]:
    """Row name -> scalings spec of every row that is the X-LoRA model with other scalings."""
    names = model.xlora_config.expert_names
    return {BASE: "zero", **{n: n for n in names}, UNIFORM: "uniform", XLORA: None}


def evaluate(model: Any, tokenizer: Any, records: Iterable[EvalRecord], config: EvalConfig | None = None, *,
             arrow_base: Callable[[], Any] | None = None, checker: Checker | None = None,
             rows: list[str] | None = None, max_new_tokens: Callable[[EvalRecord], int] | None = None,
             model_name: str = "", progress: bool = True) -> EvalResult:
    """Losses of every row, X-LoRA's routing and, with ``config.generate``, task scores.

    Args:
        model: an :class:`~xlora.model.XLoraModel` (put in eval mode).
        tokenizer: its tokenizer.
        records: scorable records (:func:`~xlora.analysis.eval_data.iter_eval_records`); streamed once.
        arrow_base: returns a fresh copy of the base model for PEFT's Arrow router (None: no ``arrow`` row).
        checker: ``(raw record, answer) -> score in [0, 1]`` (default: :func:`check_answer`).
        rows: the rows to compute (default: ``base``, each expert, ``uniform``, ``oracle``, ``arrow``, ``xlora``).
        max_new_tokens: a per-record answer budget (default: ``config.max_new_tokens``).

    Returns:
        :class:`~xlora.analysis.eval_report.EvalResult` (``to_json`` gives the ``xlora-eval/1`` schema).
    """
    config = config or EvalConfig()
    model.eval()
    names = model.xlora_config.expert_names
    known = [BASE, *names, UNIFORM, ORACLE, ARROW, XLORA]
    want = rows or known
    if unknown := [r for r in want if r not in known]:
        raise ValueError(f"rows {unknown} are not rows of this model; choose among {known}")
    # the oracle reads the expert rows' per-record losses: they run even when not reported
    fixed = {r: s for r, s in fixed_rows(model).items() if r in want or (ORACLE in want and r in names)}
    skipped: dict[str, str] = {}
    arrow = None
    if ARROW in want:
        arrow, reason = build_arrow(model, arrow_base, config.arrow_top_k)
        if reason:
            skipped[ARROW] = reason
    totals = Totals(names, [r for r in want if r in fixed or (r == ARROW and arrow is not None) or r == ORACLE])
    t0 = time.perf_counter()
    samples = _loss_pass(model, tokenizer, records, config, fixed, arrow, totals, progress)
    if totals.records == 0:
        raise ValueError("no record was left to score (every one was bad and skipped); check the data files")
    result = totals.result(model_name, skipped, chat=use_chat(config, tokenizer), reference=XLORA,
                           resamples=config.resamples)
    if config.generate > 0:
        budget = max_new_tokens or (lambda r: config.max_new_tokens)
        task_scores(model, tokenizer, samples, result, fixed, arrow, checker or check_answer, budget,
                    config.answer_batch_size or 2 * config.batch_size, config.expert_answers)
    result.seconds = time.perf_counter() - t0
    if progress:
        print(f"evaluated {result.records} records, {len(result.configs)} rows in {result.seconds:.1f} s",
              file=sys.stderr)
    return result


def _loss_pass(model: Any, tokenizer: Any, records: Iterable[EvalRecord], config: EvalConfig,
               fixed: dict[str, Any], arrow: Any, totals: Totals, progress: bool) -> list[EvalRecord]:
    """Stream the records in batches into ``totals``; returns the first ``config.generate`` per domain."""
    pad = pad_token_id(tokenizer)
    bar = _progress_bar(config.max_records) if progress else (lambda n, close=False: None)
    samples: list[EvalRecord] = []
    per_domain: dict[str | None, int] = {}
    window: list[EvalRecord] = []
    shared = SharedScalingPass(model, fixed)
    for rec in records:
        totals.domains.setdefault(rec.domain if rec.domain is not None else UNLABELLED)  # file order
        if rec.reference is not None and per_domain.get(rec.domain, 0) < config.generate:
            per_domain[rec.domain] = per_domain.get(rec.domain, 0) + 1
            samples.append(rec)
        window.append(rec)
        if len(window) == config.batch_size * WINDOW:
            _score_window(model, window, pad, fixed, arrow, totals, bar, config.batch_size, shared)
            window = []
    _score_window(model, window, pad, fixed, arrow, totals, bar, config.batch_size, shared)
    bar(0, close=True)
    return samples


def _score_window(model: Any, window: list[EvalRecord], pad: int, fixed: dict[str, Any], arrow: Any,
                  totals: Totals, bar: Callable[..., None], batch_size: int, shared: SharedScalingPass) -> None:
    """Score a window of records in batches of similar length (left padding costs the longest row's length)."""
    window = sorted(window, key=lambda r: len(r.example.input_ids))
    for i in range(0, len(window), batch_size):
        _score_batch(model, window[i:i + batch_size], pad, fixed, arrow, totals, shared)
        bar(len(window[i:i + batch_size]))


@torch.no_grad()
def _score_batch(model: Any, chunk: list[EvalRecord], pad: int, fixed: dict[str, Any], arrow: Any,
                 totals: Totals, shared: SharedScalingPass) -> None:
    batch = left_padded([r.example for r in chunk], pad)
    target = batch["labels"][:, 1:] != IGNORE_INDEX  # [b, T-1]: position t predicts token t+1
    losses: dict[str, list[float]] = {}
    scalings = hidden = None
    for row, spec in fixed.items():
        if row == XLORA and hidden is not None:  # the head on the base row's states: the same scalings
            spec = model.compute_scalings(hidden=hidden, attention_mask=batch["attention_mask"])
        takes = shared.takes(row)
        per_seq, out = completion_loss(model, batch, "none", scalings=spec, output_hidden_states=takes)
        hidden = shared.states(model, batch, out) if takes else hidden
        losses[row] = per_seq.tolist()
        if row == XLORA:
            scalings = out.scalings[:, :-1].double()  # [b, T-1, L, E]
    if arrow is not None:
        losses[ARROW] = completion_loss(arrow, batch, "none")[0].tolist()
    totals.add_losses(chunk, losses, target.sum(1).tolist())
    if scalings is not None:
        totals.add_routing(chunk, scalings, target, token_entropy(scalings))


class SharedScalingPass:
    """X-LoRA's scaling pass taken from the base row's forward: with ``scaling_pass_value`` 0 over every layer it *is*
    the base's forward, so the base row's last hidden state feeds the head (no top-k: a bit-identical row, one of the
    ``E + 4`` passes per batch, ``E + 5`` with Arrow, saved). The first batch checks ``hidden_states[-1]`` against
    :meth:`~xlora.model.XLoraModel.scaling_pass`; on a mismatch X-LoRA runs its own pass from then on."""

    def __init__(self, model: Any, fixed: dict[str, Any]) -> None:
        c = model.xlora_config
        self.on = (BASE in fixed and XLORA in fixed and fixed[BASE] == "zero" and c.scaling_pass_value == 0
                   and c.scaling_pass_layers is None and c.top_k is None)
        self.checked = False

    def takes(self, row: str) -> bool:  # whether row's forward also returns its hidden states for X-LoRA
        return self.on and row == BASE

    def states(self, model: Any, batch: dict[str, Any], out: Any) -> torch.Tensor | None:
        hidden = out.hidden_states[-1]
        if not self.checked:
            self.checked = True
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            self.on = torch.equal(hidden, model.scaling_pass(**inputs))
        return hidden if self.on else None


def _progress_bar(total: int | None) -> Callable[..., None]:
    """``update(n, close=False)``: a tqdm bar on stderr when tqdm is installed, else a line per 50 records."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, unit="rec", desc="xlora eval", file=sys.stderr) if tqdm else None
    seen = [0]

    def update(n: int, close: bool = False) -> None:
        seen[0] += n
        if bar is not None:
            bar.update(n)
            if close:
                bar.close()
        elif n and seen[0] // 50 != (seen[0] - n) // 50:
            print(f"xlora eval: {seen[0]} records", file=sys.stderr)
    return update


# -------------------------------------------------------------------------------------- Arrow
def arrow_incompatibility(model: Any) -> str | None:
    """Why PEFT's Arrow cannot route over the model's experts (different ranks or target modules), or None."""
    experts = model.experts
    ranks = {e.name: e.config.get("r") for e in experts}
    if len(set(ranks.values())) > 1 or any(e.config.get("rank_pattern") for e in experts):
        return f"Arrow needs experts of one rank; these have {ranks} (or a rank_pattern)"
    targets = {e.name: _targets(e.config.get("target_modules")) for e in experts}
    if len(set(targets.values())) > 1:
        return f"Arrow needs experts on the same target modules; these have {({k: sorted(v) for k, v in targets.items()})}"
    return None


def _targets(value: Any) -> frozenset[str]:
    return frozenset([value] if isinstance(value, str) else (value or []))


def build_arrow(model: Any, arrow_base: Callable[[], Any] | None, top_k: int) -> tuple[Any, str | None]:
    """PEFT's Arrow model over the expert folders of ``model`` on ``arrow_base()``, or ``(None, reason)``."""
    if arrow_base is None:
        return None, "no base model copy was given for PEFT's Arrow router (arrow_base=None)"
    reason = arrow_incompatibility(model)
    if reason:
        return None, reason
    try:
        from peft import ArrowConfig, create_arrow_model
    except ImportError:
        return None, "this PEFT has no Arrow router (it needs peft >= 0.17 with ArrowConfig)"
    k = min(top_k, model.num_experts)
    if k < top_k:  # said, not silent: the Arrow row mixes every expert
        print(f"xlora eval: arrow_top_k={top_k} (--arrow-top-k) exceeds the model's {k} experts; Arrow mixes all {k}",
              file=sys.stderr)
    try:  # rng_seed: the prototypes' power iteration starts from a seeded vector (reproducible rows)
        arrow = create_arrow_model(arrow_base(), [str(e.path) for e in model.experts],
                                   ArrowConfig(top_k=k, rng_seed=0))
    except (ValueError, TypeError) as e:
        return None, f"PEFT's Arrow refused the experts: {str(e).splitlines()[0]}"
    return arrow.eval(), None


# -------------------------------------------------------------------------------------- task scores
@torch.no_grad()
def run_eval(model_dir: str | Path, data: list[str | Path], *, tokenize_record: TokenizeRecord,
             read_records: ReadRecords | None = None, base_model: str | None = None,
             out_dir: str | Path = "xlora-eval", config: EvalConfig | None = None) -> EvalResult:
    """The ``xlora eval MODEL_DIR --data FILE ...`` command: load, evaluate, print the tables, write
    ``eval.md``, ``eval.json``, ``eval_records.jsonl`` and ``eval.png`` (without matplotlib: the first three) to
    ``out_dir``.
    ``tokenize_record`` / ``read_records``: the trainer's parsing (see :func:`evaluate_files`)."""
    from xlora.pretrained import load_model_and_tokenizer
    from xlora.saving import load_base

    for path in data:  # a wrong path fails before the model loads (tens of seconds)
        check_data_file(path)
    model, tokenizer = load_model_and_tokenizer(model_dir, base_model=base_model)
    base_name = base_model or model.xlora_config.base_model_name_or_path
    result = evaluate_files(model, tokenizer, list(data), config, tokenize_record=tokenize_record,
                            read_records=read_records, arrow_base=lambda: load_base(str(base_name), Path(model_dir)), model_name=str(model_dir))
    print(result.to_markdown())
    try:
        paths = result.write(out_dir)
    except ImportError:
        paths = result.write(out_dir, png=False)
    print(f"written {', '.join(str(p) for p in paths)} ({result.seconds:.0f} s)")
    return result
