"""Pictures of the mixture: token x expert and layer x expert heatmaps, expert share over a generation.

Every plot is written as PNG and SVG (matplotlib's Agg canvas, no pyplot state), atomically.
Long inputs are **paginated**: at most ``per_page`` rows (tokens or layers) per file, named
``<stem>-p01.png``, ``<stem>-p02.png``, ... so that 200+ tokens stay readable at a fixed row
height (``ROW_PX`` pixels per row) instead of being squeezed into one unreadable figure.
Sizes are exact in pixels (``DPI`` = 100), so callers and tests can predict them.

Token labels are the decoded tokens with whitespace made visible (:func:`display_token`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Module names without their common dotted prefix (``model.layers.0.self_attn.q_proj`` -> ``0.self_attn.q_proj``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


@dataclass
class PlotPage:
    """One written figure: its files, pixel size and the tick labels read back from its axes."""

    png: Path
    svg: Path
    size_px: tuple[int, int]
    y_labels: list[str]
    x_labels: list[str]
    legend: list[str]


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
                   out_dir: Path, stem: str, per_page: int, what: str) -> list[PlotPage]:
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
                            [t.get_text() for t in ax.get_xticklabels()], []))
    return out


def token_expert_heatmap(scalings: torch.Tensor, tokens: Sequence[str], expert_names: Sequence[str],
                         out_dir: str | Path, stem: str = "tokens", per_page: int = PER_PAGE) -> list[PlotPage]:
    """Token x expert heatmap of the layer-averaged scalings.

    Args:
        scalings: ``[T, L, E]`` (one sequence, padding removed) or ``[T, E]``.
        tokens: the ``T`` decoded tokens, row labels (shown through :func:`display_token`).
        expert_names: the ``E`` column labels.
        out_dir: folder for ``<stem>-pNN.png`` / ``.svg``.
        per_page: rows per file.
    """
    m = scalings.float().mean(1) if scalings.dim() == 3 else scalings  # [T, E]
    if m.dim() != 2 or m.shape[0] != len(tokens) or m.shape[1] != len(expert_names):
        raise ValueError(f"scalings {tuple(scalings.shape)} do not fit {len(tokens)} tokens x {len(expert_names)} experts")
    return _heatmap_pages(m, [display_token(t) for t in tokens], list(expert_names),
                          "mixture per token (layers averaged)", Path(out_dir), stem, per_page, "tokens")


def layer_expert_heatmap(scalings: torch.Tensor, layer_names: Sequence[str], expert_names: Sequence[str],
                         out_dir: str | Path, stem: str = "layers", per_page: int = PER_PAGE,
                         row_kind: str = "adapted module") -> list[PlotPage]:
    """Layer x expert heatmap of the token-averaged scalings ``[T, L, E]``; rows are :func:`short_layer_names`.

    ``row_kind`` names a row in the title (e.g. ``"block"`` when the rows are groups of modules).
    """
    if scalings.dim() != 3 or scalings.shape[1:] != (len(layer_names), len(expert_names)):
        raise ValueError(f"scalings {tuple(scalings.shape)} do not fit [T, L={len(layer_names)}, E={len(expert_names)}]")
    m = scalings.float().mean(0)  # [L, E]
    return _heatmap_pages(m, short_layer_names(layer_names), list(expert_names),
                          f"mixture per {row_kind} (mean over {scalings.shape[0]} "
                          f"token{'s' if scalings.shape[0] != 1 else ''})", Path(out_dir),
                          stem, per_page, f"{row_kind}s")


def generation_share_plot(step_scalings: torch.Tensor, tokens: Sequence[str], expert_names: Sequence[str],
                          out_dir: str | Path, stem: str = "generation", per_page: int = PER_PAGE) -> list[PlotPage]:
    """Expert share over a generation: stacked bars, one per generated token, layers averaged.

    Args:
        step_scalings: ``[N, L, E]``: for generated token ``k``, the scalings of the step that
            predicted it (as returned by :func:`xlora.generation.generate_text`).
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
        ax.set_xlabel("generated token", fontsize=8)
        span = f"tokens {cols.start + 1}-{cols.stop} of {m.shape[0]}" + (f", page {p}/{len(pages)}" if len(pages) > 1 else "")
        ax.set_title(f"expert share per generated token\n{span}", fontsize=9)
        leg = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        png, svg = _save(fig, Path(out_dir), f"{stem}-p{p:02d}")
        out.append(PlotPage(png, svg, (w, h), [], [t.get_text() for t in ax.get_xticklabels()],
                            [t.get_text() for t in leg.get_texts()]))
    return out
