"""Pictures of the mixture: token x expert and layer x expert heatmaps, expert share over a generation.

Every plot is written as PNG and SVG (matplotlib's Agg canvas, no pyplot state), atomically.
Long inputs are **paginated**: at most ``per_page`` rows (tokens or layers) per file, named
``<stem>-p01.png``, ``<stem>-p02.png``, ... so that 200+ tokens stay readable at a fixed row
height (``ROW_PX`` pixels per row) instead of being squeezed into one unreadable figure.
Sizes are exact in pixels (``DPI`` = 100), so callers and tests can predict them.

Token labels are the decoded tokens with whitespace made visible (:func:`display_token`); each token is
shown with the mixture that *wrote* it and module rows are grouped by decoder layer, as
:mod:`xlora.analysis.views` defines for every view (the axis labels say so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlora.analysis.views import GENERATED_AXIS, TOKEN_AXIS, module_rows
from xlora.files import atomic_write

DPI = 100
ROW_PX = 20            # heatmap row height
COL_PX = 60            # heatmap column (expert) width
TOP_PX, BOTTOM_PX = 50, 90
RIGHT_PX = 100         # colour bar and its labels
STEP_PX = 16           # one generated token in the share plot
SHARE_HEIGHT_PX = 460
LEGEND_PX = 170
PER_PAGE = 64
# matplotlib's tab10, so terminal colours (rich) and plots agree without importing matplotlib.
EXPERT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def expert_color(e: int) -> str:
    """The colour of expert ``e`` (cycles after 10)."""
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def display_token(piece: str) -> str:
    """A decoded token made visible: spaces as ``␣``, newlines as ``↵``, other control characters escaped."""
    out = piece.replace(" ", "\u2423").replace("\n", "\u21b5")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out)
    return out or "\u2205"


@dataclass
class PlotPage:
    """One written figure: its files, pixel size and the tick labels read back from its axes."""

    png: Path
    svg: Path
    size_px: tuple[int, int]
    y_labels: list[str]
    x_labels: list[str]
    legend: list[str]
    values: list[list[float]]  # the page's plotted rows [rows, E] (heatmap cells, or bar heights per token)
    axis_label: str = ""  # the token or module axis: says which token a row shows, or what a row averages


def _figure(width_px: int, height_px: int) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'xlora[viz]'") from None
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_dir: Path, name: str) -> tuple[Path, Path]:
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    atomic_write(svg, lambda tmp: fig.savefig(tmp, format="svg", dpi=DPI, metadata={"Date": None}))
    return png, svg


def _pages(n: int, per_page: int) -> list[range]:
    if per_page < 1:
        raise ValueError(f"per_page={per_page} must be >= 1")
    return [range(i, min(i + per_page, n)) for i in range(0, n, per_page)] or [range(0)]


def _label_px(labels: Sequence[str]) -> int:
    return min(400, max(80, 20 + 7 * max((len(s) for s in labels), default=0)))


def _heatmap_pages(matrix: torch.Tensor, row_labels: list[str], col_labels: list[str], title: str,
                   out_dir: Path, stem: str, per_page: int, what: str, axis_label: str) -> list[PlotPage]:
    """``matrix`` ``[R, E]`` as paginated heatmaps, rows labelled by ``row_labels``; one colour scale for all pages."""
    m = matrix.detach().cpu().float()
    lo, hi = min(0.0, float(m.min())) if m.numel() else 0.0, float(m.max()) if m.numel() else 1.0
    hi = hi if hi > lo else lo + 1.0
    left, E = _label_px(row_labels), m.shape[1]
    pages = _pages(m.shape[0], per_page)
    out = []
    for p, rows in enumerate(pages, 1):
        n = max(len(rows), 1)
        w, h = left + COL_PX * E + RIGHT_PX, TOP_PX + ROW_PX * n + BOTTOM_PX
        fig = _figure(w, h)
        ax = fig.add_axes((left / w, BOTTOM_PX / h, COL_PX * E / w, ROW_PX * n / h))
        block = m[rows.start:rows.stop]
        im = ax.imshow(block.numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks(range(len(rows)), [row_labels[i] for i in rows], fontsize=8, parse_math=False)
        ax.set_xticks(range(E), col_labels, fontsize=8, rotation=30, ha="right", parse_math=False)
        ax.set_ylabel(axis_label, fontsize=8)
        if E <= 16:  # the weights themselves, readable at this cell size
            for (i, j), v in zip(torch.cartesian_prod(torch.arange(len(rows)), torch.arange(E)).tolist(),
                                 block.flatten().tolist()):
                dark = (v - lo) / (hi - lo) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        span = f"{what} {rows.start + 1}-{rows.stop} of {m.shape[0]}" + (f", page {p}/{len(pages)}" if len(pages) > 1 else "")
        ax.set_title(f"{title}\n{span}", fontsize=9)
        cax = fig.add_axes(((left + COL_PX * E + 15) / w, BOTTOM_PX / h, 12 / w, ROW_PX * n / h))
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
        png, svg = _save(fig, out_dir, f"{stem}-p{p:02d}")
        out.append(PlotPage(png, svg, (w, h), [t.get_text() for t in ax.get_yticklabels()],
                            [t.get_text() for t in ax.get_xticklabels()], [], block.tolist(), ax.get_ylabel()))
    return out


def token_expert_heatmap(scalings: torch.Tensor, tokens: Sequence[str], expert_names: Sequence[str],
                         out_dir: str | Path, stem: str = "tokens", per_page: int = PER_PAGE) -> list[PlotPage]:
    """Token x expert heatmap of the layer-averaged scalings, each token with the mixture that wrote it.

    Args:
        scalings: ``[n, L, E]`` (or ``[n, E]``): row ``k`` is the mixture that wrote ``tokens[k]``
            (:func:`xlora.analysis.views.written_by` lines a sequence's rows up this way).
        tokens: the ``n`` decoded tokens written, row labels (shown through :func:`display_token`).
        expert_names: the ``E`` column labels.
        out_dir: folder for ``<stem>-pNN.png`` / ``.svg``.
        per_page: rows per file.
    """
    m = scalings.float().mean(1) if scalings.dim() == 3 else scalings  # [n, E]
    if m.dim() != 2 or m.shape[0] != len(tokens) or m.shape[1] != len(expert_names):
        raise ValueError(f"scalings {tuple(scalings.shape)} do not fit {len(tokens)} tokens x {len(expert_names)} experts")
    return _heatmap_pages(m, [display_token(t) for t in tokens], list(expert_names),
                          "mixture that wrote each token (layers averaged)", Path(out_dir), stem, per_page, "tokens",
                          TOKEN_AXIS)


def layer_expert_heatmap(scalings: torch.Tensor, module_names: Sequence[str], expert_names: Sequence[str],
                         out_dir: str | Path, stem: str = "layers", per_page: int = PER_PAGE,
                         shared: bool | None = None) -> list[PlotPage]:
    """Module x expert heatmap of the token-averaged scalings ``[T, L, E]``, rows as
    :func:`xlora.analysis.views.module_rows` groups them: one row when the modules share one mixture
    (``shared=True``, a head without ``layerwise_scalings``, or equal rows), else one per decoder layer
    (the mean over its modules), else one per module.
    """
    if scalings.dim() != 3 or scalings.shape[1:] != (len(module_names), len(expert_names)):
        raise ValueError(f"scalings {tuple(scalings.shape)} do not fit [T, L={len(module_names)}, E={len(expert_names)}]")
    rows = module_rows(module_names, scalings, shared)
    m = rows.reduce(scalings.float().mean(0))  # [R, E]
    T = scalings.shape[0]
    return _heatmap_pages(m, rows.labels, list(expert_names),
                          f"mixture per {rows.kind.split(' (')[0]} (mean over {T} token{'s' if T != 1 else ''})",
                          Path(out_dir), stem, per_page, "rows", rows.kind)


def generation_share_plot(step_scalings: torch.Tensor, tokens: Sequence[str], expert_names: Sequence[str],
                          out_dir: str | Path, stem: str = "generation", per_page: int = PER_PAGE) -> list[PlotPage]:
    """Expert share over a generation: stacked bars, one per generated token, layers averaged.

    Args:
        step_scalings: ``[N, L, E]``: row ``k`` is the mixture that wrote generated token ``k`` (the
            last position of the step that chose it, as :meth:`xlora.generation.StepRecorder.per_token`
            returns it).
        tokens: the ``N`` decoded generated tokens, x labels.
        expert_names: the ``E`` experts (legend, coloured with :func:`expert_color`).
        per_page: tokens per file.
    """
    if step_scalings.dim() != 3 or step_scalings.shape[0] != len(tokens) or step_scalings.shape[2] != len(expert_names):
        raise ValueError(f"step_scalings {tuple(step_scalings.shape)} do not fit {len(tokens)} tokens x "
                         f"{len(expert_names)} experts; expected [N, L, E]")
    m = step_scalings.detach().cpu().float().mean(1)  # [N, E]
    labels = [display_token(t) for t in tokens]
    top = max(1.0, float(m.clamp_min(0).sum(1).max())) if m.numel() else 1.0
    pages = _pages(m.shape[0], per_page)
    out = []
    for p, cols in enumerate(pages, 1):
        n = max(len(cols), 1)
        w, h = 70 + STEP_PX * max(n, 12) + LEGEND_PX, SHARE_HEIGHT_PX
        fig = _figure(w, h)
        ax = fig.add_axes((70 / w, 110 / h, STEP_PX * max(n, 12) / w, (h - 110 - 50) / h))
        block, bottom = m[cols.start:cols.stop], torch.zeros(len(cols))
        for e, name in enumerate(expert_names):
            v = block[:, e].clamp_min(0)
            ax.bar(range(len(cols)), v.numpy(), width=1.0, bottom=bottom.numpy(), color=expert_color(e), label=name)
            bottom += v
        ax.set_xlim(-0.5, max(n, 12) - 0.5)
        ax.set_ylim(0, top)
        ax.set_xticks(range(len(cols)), [labels[i] for i in cols], fontsize=8, rotation=90, parse_math=False)
        ax.set_ylabel("expert weight (layers averaged)", fontsize=8)
        ax.set_xlabel(GENERATED_AXIS, fontsize=8)
        span = f"tokens {cols.start + 1}-{cols.stop} of {m.shape[0]}" + (f", page {p}/{len(pages)}" if len(pages) > 1 else "")
        ax.set_title(f"expert share per generated token\n{span}", fontsize=9)
        leg = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        png, svg = _save(fig, Path(out_dir), f"{stem}-p{p:02d}")
        out.append(PlotPage(png, svg, (w, h), [], [t.get_text() for t in ax.get_xticklabels()],
                            [t.get_text() for t in leg.get_texts()], block.clamp_min(0).tolist(), ax.get_xlabel()))
    return out
