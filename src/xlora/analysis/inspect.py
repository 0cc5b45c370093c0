"""``xlora inspect``: run a prompt (optionally generate), log the scalings, print a summary, write plots.

Conventions (:mod:`xlora.analysis.views`, shared by every view): the statistics use one row per
token *read* by the model (the prompt, then every generated token but the last, which is never fed
back). Every per-token view (the coloured prompt and answer, the token heatmap, the generation plot,
``token_experts`` in ``stats.json``) shows a token with the mixture that *wrote* it: the row of the
position before it, as ``xlora generate --show-experts`` does; the first prompt token was written by
no mixture and stays plain. Dominant = argmax of the layer-averaged mixture. The module heatmap
groups the adapted modules by decoder layer, or draws one row when they share one mixture.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from xlora.analysis.log import ScalingsLog
from xlora.analysis.stats import ExpertStats, MixtureSummary, expert_stats, mixture_summary
from xlora.analysis.views import TOKEN_AXIS, WrittenTokens, written_by
from xlora.files import atomic_write_text
from xlora.generation import encode_prompt, pad_token_id

LOG_FILE = "scalings.safetensors"
STATS_FILE = "stats.json"


@dataclass
class Inspection:
    """What one prompt did: the log, the token ids and the statistics over the rows read.

    ``rows`` is ``[T, L, E]`` for the ``T = len(prompt_ids) + max(len(new_ids) - 1, 0)`` tokens read.
    """

    log: ScalingsLog
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    rows: torch.Tensor
    stats: ExpertStats
    summary: MixtureSummary

    @property
    def written(self) -> WrittenTokens:
        """Every token after the first with the mixture that wrote it (row ``t`` wrote token ``t + 1``)."""
        return written_by(self.prompt_ids + self.new_ids, self.rows)

    @property
    def answer(self) -> WrittenTokens:
        """The generated tokens with the mixture that wrote each (``[N, L, E]``)."""
        w = self.written
        start = len(self.prompt_ids) - 1
        return WrittenTokens(w.ids[start:], w.scalings[start:])


def inspect_prompt(model: Any, tokenizer: Any, prompt: str, *, generate: int = 0, chat: bool = False,
                   info: dict[str, Any] | None = None) -> Inspection:
    """Run ``prompt`` through ``model`` (and greedily generate ``generate`` tokens), recording the scalings."""
    if generate < 0:
        raise ValueError(f"generate={generate} must be >= 0 (the number of new tokens)")
    enc = encode_prompt(tokenizer, prompt, chat=chat, device=model.device)
    log = ScalingsLog.for_model(model, {"prompt": prompt, "chat": chat, **(info or {}),
                                        "layerwise_scalings": bool(model.xlora_config.layerwise_scalings)})
    with torch.inference_mode():
        if generate:
            out = model.generate(**enc, max_new_tokens=generate, do_sample=False, observer=log,
                                 pad_token_id=pad_token_id(tokenizer))
            new_ids = out[0, enc["input_ids"].shape[1]:].tolist()
        else:
            model(**enc, observer=log)
            new_ids = []
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    log.info.update(prompt_ids=enc["input_ids"][0].tolist(), new_ids=new_ids, text=text)
    _, rows = log.sequence(0)
    return Inspection(log, enc["input_ids"][0].tolist(), new_ids, text, rows,
                      expert_stats(rows, log.expert_names, log.layer_names), mixture_summary(rows))


def write_outputs(result: Inspection, tokenizer: Any, out_dir: str | Path, per_page: int | None = None) -> list[Path]:
    """Write the log, ``stats.json`` and the plots (PNG + SVG) into ``out_dir``; returns the paths."""
    from xlora.analysis import plots

    out, log = Path(out_dir), result.log
    page = {"per_page": per_page} if per_page else {}
    names = log.expert_names
    written = result.written
    pieces = written.pieces(tokenizer)
    paths = [log.save(out / LOG_FILE)]
    stats = {"tokens": pieces, "token_convention": TOKEN_AXIS,
             "token_experts": [[p, e, w] for p, (e, w) in zip(pieces, written.dominant(names))],
             "expert_stats": result.stats.to_dict(), "mixture": result.summary.to_dict(),
             "prompt": log.info.get("prompt"), "answer": result.text}
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    paths.append(out / STATS_FILE)
    shared = None if "layerwise_scalings" not in log.info else not log.info["layerwise_scalings"]
    pages = plots.token_expert_heatmap(written.scalings, pieces, names, out, **page)
    pages += plots.layer_expert_heatmap(result.rows, log.layer_names, names, out, shared=shared, **page)
    if result.new_ids:
        answer = result.answer
        pages += plots.generation_share_plot(answer.scalings, answer.pieces(tokenizer), names, out, **page)
    return paths + [p for pg in pages for p in (pg.png, pg.svg)]


def _runs(result: Inspection, tokenizer: Any, ids: list[int], start: int) -> list[tuple[int | None, str]]:
    """``(expert or None, text)`` runs of the tokens ``ids`` at positions ``start...``, merged by colour;
    a token's colour is the expert that wrote it (None for the first token)."""
    dom = result.written.mixture.argmax(-1).tolist()  # dom[j - 1] wrote the token at position j
    runs: list[tuple[int | None, str]] = []
    for j, tid in enumerate(ids, start):
        e = dom[j - 1] if 0 < j <= len(dom) else None
        piece = tokenizer.decode([tid])
        if runs and runs[-1][0] == e:
            runs[-1] = (e, runs[-1][1] + piece)
        else:
            runs.append((e, piece))
    return runs


def print_inspection(result: Inspection, tokenizer: Any, file: TextIO | None = None,
                     color: bool | None = None) -> None:
    """The expert table and the coloured prompt/answer; ``color=None`` means rich when ``file`` is a TTY.

    Each token is coloured by the expert that wrote it (the mixture at the position before it); the plain
    form marks each run of tokens with that expert: ``[alpha]Hel[beta]lo`` (``[-]``: the first token, written
    by no mixture).
    """
    file = file or sys.stdout
    names, s, m = result.log.expert_names, result.stats, result.summary
    if color is None:
        color = bool(getattr(file, "isatty", lambda: False)())
    T, L = result.rows.shape[:2]
    head = (f"{T} tokens read (prompt {len(result.prompt_ids)}, generated {len(result.new_ids)}) "
            f"x {L} modules x {len(names)} experts")
    cover = ", ".join(f"top-{k} coverage {v:.4f}" for k, v in m.topk_coverage.items())
    foot = (f"entropy {m.mean_entropy:.4f} nats ({m.normalized_entropy:.4f} of ln E), {cover}\n"
            f"colours: the expert that wrote each token (the mixture at the position before it)")
    parts = [("prompt", _runs(result, tokenizer, result.prompt_ids, 0))]
    if result.new_ids:
        parts.append(("answer", _runs(result, tokenizer, result.new_ids, len(result.prompt_ids))))
    if color:
        try:
            from rich.console import Console
        except ImportError:
            color = False
    if not color:
        w = max(len("expert"), *(len(n) for n in names))
        lines = [head, f"{'expert':<{w}}  {'mean':>8}  {'dominant':>8}"]
        lines += [f"{n:<{w}}  {s.mean_weight[n]:>8.4f}  {s.dominant_share[n]:>8.4f}" for n in names]
        lines.append(foot)
        for label, runs in parts:
            lines.append(f"{label}: " + "".join(f"[{names[e] if e is not None else '-'}]{t}" for e, t in runs))
        file.write("\n".join(lines) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    from xlora.analysis.plots import expert_color

    console = Console(file=file, highlight=False, force_terminal=True)
    table = Table(title=head, title_justify="left")
    for col in ("expert", "mean", "dominant"):
        table.add_column(col, justify="left" if col == "expert" else "right")
    for e, n in enumerate(names):
        table.add_row(Text(n, style=f"bold {expert_color(e)}"), f"{s.mean_weight[n]:.4f}", f"{s.dominant_share[n]:.4f}")
    console.print(table)
    console.print(foot)
    for label, runs in parts:
        text = Text(f"{label}: ", style="bold")
        for e, t in runs:
            text.append(t, style=f"bold {expert_color(e)}" if e is not None else "dim")
        console.print(text)


def run_inspect(model_dir: str | Path, prompt: str, *, generate: int = 0, out_dir: str | Path = "xlora-inspect",
                chat: bool = False, base_model: str | None = None, per_page: int | None = None,
                file: TextIO | None = None) -> list[Path]:
    """Load ``model_dir``, inspect ``prompt``, print the summary to ``file`` and write the outputs."""
    from xlora.pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir, base_model=base_model)
    result = inspect_prompt(model, tokenizer, prompt, generate=generate, chat=chat,
                            info={"model_dir": str(model_dir)})
    print_inspection(result, tokenizer, file)
    paths = write_outputs(result, tokenizer, out_dir, per_page)
    (file or sys.stdout).write(f"wrote {len(paths)} files to {out_dir}\n")
    return paths
