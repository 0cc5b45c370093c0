"""``xlora graph``: a knowledge graph from a text file, each edge coloured by the expert that wrote it.

The text is cut into chunks of whole sentences; for each chunk the X-LoRA model is asked (in the
``graph`` domain's first phrasing) for ``subject | relation | object`` lines, decoded greedily while a
:class:`~xlora.generation.StepRecorder` keeps every token's scalings. Each output line is parsed by
:func:`xlora.demo.triples.parse_line` (malformed lines are counted and skipped), and gets the expert
with the largest mean scaling over the line's tokens (layers averaged). Entities are merged by
:func:`~xlora.demo.triples.normalise`; the graph is a ``networkx.MultiDiGraph`` (one edge per triple,
so two relations between the same pair stay two edges) written as GraphML, JSON, PNG and HTML.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlora.demo.evaluate import generate_answers
from xlora.demo.phrasings import templates
from xlora.demo.triples import is_filler, key_of, normalise, parse_line
from xlora.files import atomic_write, atomic_write_text

_CDN_TAG = re.compile(r"<link[^>]*bootstrap[^>]*>|<script[^>]*bootstrap[^>]*>\s*</script>", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
MAX_NEW_TOKENS = 128


def chunk_text(text: str, max_chars: int = 600) -> list[str]:
    """Whole sentences packed greedily into chunks of at most ``max_chars`` characters (a longer sentence
    is cut at word boundaries, a longer word at ``max_chars``); blank input gives no chunk."""
    if max_chars < 20:
        raise ValueError(f"max_chars must be >= 20, got {max_chars}")
    pieces: list[str] = []
    for sentence in (" ".join(s.split()) for s in _SENTENCE_END.split(text)):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    return chunks


def graph_prompt(chunk: str) -> str:
    """The request for one chunk: the ``graph`` domain's first (seen) phrasing."""
    return templates("graph")[0].format(p=chunk)


@dataclass
class Edge:
    """One extracted triple with where it came from and the mixture while it was written."""

    subject: str
    relation: str
    object: str
    chunk: int
    expert: str
    scalings: dict[str, float]


@dataclass
class Extraction:
    """Everything :func:`extract` read from the model: edges, malformed lines, raw outputs per chunk."""

    chunks: list[str]
    outputs: list[str] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0


def line_experts(tokenizer: Any, ids: list[int], scalings: torch.Tensor, names: list[str]
                 ) -> list[tuple[str, dict[str, float]]]:
    """For each line of the decoded ``ids``: its text and the layer-averaged mean scalings over its tokens.

    Args:
        scalings: ``[n, L, E]``, one row per generated token (as :class:`~xlora.generation.StepRecorder`
            lines them up). A token that spans a line break counts for both lines.
    """
    per_token = scalings.float().mean(1) if len(ids) else torch.zeros(0, len(names))  # [n, E]
    ends = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    out, start = [], 0
    for line in text.split("\n"):
        stop = start + len(line)
        tokens = [k for k in range(len(ids)) if (ends[k - 1] if k else 0) <= stop and ends[k] > start]
        mean = per_token[tokens].mean(0) if tokens else torch.zeros(len(names))
        out.append((line, dict(zip(names, mean.tolist()))))
        start = stop + 1
    return out


def extract(model: Any, tokenizer: Any, chunks: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
            batch_size: int = 8) -> Extraction:
    """Ask the model for the triples of every chunk (greedy) and parse its lines (see the module doc)."""
    names = model.xlora_config.expert_names
    result = Extraction(chunks)
    records = [{"prompt": graph_prompt(c)} for c in chunks]
    texts, ids, scalings = generate_answers(model, tokenizer, records, "xlora", max_new_tokens, batch_size,
                                            record_scalings=True)
    seen: set[tuple[str, str, str]] = set()
    for i, (text, new, s) in enumerate(zip(texts, ids, scalings)):
        result.outputs.append(text)
        for line, mix in line_experts(tokenizer, new, s, names):
            if is_filler(line):
                continue
            triple = parse_line(line)
            if triple is None:
                result.malformed.append({"chunk": i, "line": line[:200]})
                continue
            if key_of(triple) in seen:
                result.duplicates += 1
                continue
            seen.add(key_of(triple))
            expert = max(mix, key=mix.get) if any(mix.values()) else ""
            result.edges.append(Edge(*triple, chunk=i, expert=expert, scalings=mix))
    return result


def build_graph(edges: list[Edge]) -> Any:
    """A ``networkx.MultiDiGraph``: nodes keyed by :func:`normalise` (attribute ``label``: the first spelling
    seen, ``mentions``), one edge per triple (``relation``, ``expert``, ``chunk``, ``scaling_<expert>``)."""
    import networkx as nx

    g = nx.MultiDiGraph()
    for e in edges:
        for name in (e.subject, e.object):
            key = normalise(name)
            if key in g:
                g.nodes[key]["mentions"] += 1
            else:
                g.add_node(key, label=name, mentions=1)
        g.add_edge(normalise(e.subject), normalise(e.object), relation=e.relation, expert=e.expert, chunk=e.chunk,
                   **{f"scaling_{k}": round(v, 6) for k, v in e.scalings.items()})
    return g


def _colours(names: list[str]) -> dict[str, str]:
    from xlora.analysis.plots import expert_color

    return {n: expert_color(i) for i, n in enumerate(names)} | {"": "#888888"}


def write_png(g: Any, path: Path, names: list[str], title: str = "") -> Path:
    """The graph drawn with matplotlib: parallel edges merged into one arrow labelled with every relation,
    coloured by the first edge's expert; a legend of the experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    colour = _colours(names)
    simple = nx.DiGraph()
    simple.add_nodes_from(g.nodes(data=True))
    for u, v, data in g.edges(data=True):
        if simple.has_edge(u, v):
            simple[u][v]["label"] += "; " + data["relation"]
        else:
            simple.add_edge(u, v, label=data["relation"], color=colour.get(data["expert"], "#888888"))
    fig, ax = plt.subplots(figsize=(12, 9), dpi=100)
    pos = nx.spring_layout(simple, seed=0, k=1.2 / max(1, len(simple)) ** 0.5) if len(simple) else {}
    nx.draw_networkx_nodes(simple, pos, ax=ax, node_color="#eeeeee", edgecolors="#444444", node_size=600)
    nx.draw_networkx_labels(simple, pos, {n: d["label"] for n, d in simple.nodes(data=True)}, ax=ax, font_size=8)
    nx.draw_networkx_edges(simple, pos, ax=ax, edge_color=[d["color"] for *_, d in simple.edges(data=True)],
                           arrows=True, arrowsize=12, width=1.8, node_size=600)
    nx.draw_networkx_edge_labels(simple, pos, nx.get_edge_attributes(simple, "label"), ax=ax, font_size=7)
    for n in names:
        ax.plot([], [], color=colour[n], linewidth=3, label=n)
    ax.legend(title="expert", loc="upper left", fontsize=8)
    ax.set_title(title or f"{g.number_of_nodes()} entities, {g.number_of_edges()} triples")
    ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_html(g: Any, path: Path, names: list[str]) -> Path:
    """An interactive page (pyvis with vis-network inlined, no CDN, so it opens offline): edges labelled with
    their relation and coloured by expert; hovering an edge shows the expert and its mean scaling."""
    from pyvis.network import Network

    colour = _colours(names)
    net = Network(height="800px", width="100%", directed=True, cdn_resources="in_line")
    for node, data in g.nodes(data=True):
        net.add_node(node, label=data["label"], title=f"{data['label']} ({data['mentions']} mentions)")
    for u, v, data in g.edges(data=True):
        weight = data.get(f"scaling_{data['expert']}", 0.0)
        net.add_edge(u, v, label=data["relation"], color=colour.get(data["expert"], "#888888"),
                     title=f"{data['relation']}: expert {data['expert'] or '-'} (mean scaling {weight:.2f})")
    html = _CDN_TAG.sub("", net.generate_html(notebook=False))  # pyvis adds Bootstrap (layout only) from a CDN
    atomic_write_text(path, html)
    return path


def graph_json(g: Any, extraction: Extraction, names: list[str]) -> dict[str, Any]:
    """The JSON document: nodes, edges (with their scalings), per-expert edge counts, chunks and what was skipped."""
    edges = [{"source": u, "target": v, **d} for u, v, d in g.edges(data=True)]
    return {
        "experts": names,
        "nodes": [{"id": n, **d} for n, d in g.nodes(data=True)],
        "edges": edges,
        "edges_per_expert": {n: sum(e["expert"] == n for e in edges) for n in names},
        "chunks": extraction.chunks,
        "outputs": extraction.outputs,
        "malformed": extraction.malformed,
        "n_malformed": len(extraction.malformed),
        "duplicates": extraction.duplicates,
    }


def write_outputs(g: Any, extraction: Extraction, out_dir: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """``graph.graphml``, ``graph.json``, ``graph.png`` and ``graph.html`` in ``out_dir``."""
    import networkx as nx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"graphml": out / "graph.graphml", "json": out / "graph.json", "png": out / "graph.png",
             "html": out / "graph.html"}
    atomic_write(paths["graphml"], lambda tmp: nx.write_graphml(g, tmp))
    atomic_write_text(paths["json"], json.dumps(graph_json(g, extraction, names), indent=2) + "\n")
    write_png(g, paths["png"], names)
    write_html(g, paths["html"], names)
    return paths


def make_graph(model: Any, tokenizer: Any, text: str, out_dir: str | os.PathLike, chunk_chars: int = 600,
               max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[Any, Extraction, dict[str, Path]]:
    """Chunk ``text``, extract triples with ``model``, build the graph and write its four files."""
    extraction = extract(model, tokenizer, chunk_text(text, chunk_chars), max_new_tokens)
    g = build_graph(extraction.edges)
    names = model.xlora_config.expert_names
    return g, extraction, write_outputs(g, extraction, out_dir, names)


def run_graph(text_file: str | os.PathLike, out_dir: str | os.PathLike, assets: str | os.PathLike | None = None,
              base_dir: str | os.PathLike | None = None, chunk_chars: int = 600,
              max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    """The ``xlora graph`` command over the demo model (or the X-LoRA directory ``assets``)."""
    from xlora.demo.base_model import load_demo

    path = Path(text_file)
    if path.is_dir():
        raise ValueError(f"text_file {str(path)!r} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text_file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); give a UTF-8 "
                         "text file (e.g. convert it with iconv)") from None
    if not text.strip():
        raise ValueError(f"text_file {str(path)!r} holds no text (empty or only whitespace); give the passage to read")
    model, tokenizer = load_demo(assets, base_dir)
    g, extraction, paths = make_graph(model, tokenizer, text, out_dir, chunk_chars, max_new_tokens)
    counts = graph_json(g, extraction, model.xlora_config.expert_names)["edges_per_expert"]
    print(f"{len(extraction.chunks)} chunks -> {g.number_of_nodes()} entities, {g.number_of_edges()} triples "
          f"({len(extraction.malformed)} malformed lines skipped, {extraction.duplicates} duplicates); "
          f"edges by expert: {counts}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
