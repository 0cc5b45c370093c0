"""Triple extraction measured on the held-out graph passages: precision, recall and F1 per configuration.

Every configuration of :mod:`xlora.demo.evaluate` (the base model, each expert alone, the uniform
mixture, X-LoRA) answers the same held-out passages greedily; answers are parsed with
:func:`xlora.demo.triples.parse_triples` and matched against the gold triples after normalisation.
Precision and recall are micro-averaged over all passages (pooled triple counts). For X-LoRA the
routing of the graph prompts is reported too: the mean layer-averaged scalings over the generated
tokens and the fraction of passages whose largest mean scaling is the ``graph`` expert's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xlora.demo import domains
from xlora.demo.evaluate import BASE, GRAPH_NEW_TOKENS, UNIFORM, XLORA, generate_answers
from xlora.demo.triples import key_of, parse_triples
from xlora.files import atomic_write_text


def score_answers(answers: list[str], gold: list[list[tuple[str, str, str]]]) -> dict[str, float]:
    """Micro precision / recall / F1 and the malformed lines of ``answers`` against ``gold`` triples."""
    hit = predicted = expected = malformed = 0
    for text, triples in zip(answers, gold):
        parsed = parse_triples(text)
        p, g = {key_of(t) for t in parsed.triples}, {key_of(tuple(t)) for t in triples}
        hit, predicted, expected = hit + len(p & g), predicted + len(p), expected + len(g)
        malformed += parsed.n_malformed
    precision = hit / predicted if predicted else 0.0
    recall = hit / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted": predicted, "gold": expected,
            "malformed_lines": malformed}


def evaluate_triples(model: Any, tokenizer: Any, n: int = 32, split: str = "test", seed: int = 0,
                     configs: list[str] | None = None, max_new_tokens: int = GRAPH_NEW_TOKENS,
                     progress: Any = None) -> dict[str, Any]:
    """``{"split", "n", "scores": {config: {precision, recall, f1, ...}}, "routing": {...}}`` on ``n`` graph
    records of ``split`` (``test``: held-out entities and sentence shapes, seen phrasings; ``test_unseen``:
    passages drawn from the same held-out pool, asked in unseen phrasings)."""
    names = model.xlora_config.expert_names
    configs = configs or [BASE, *names, UNIFORM, XLORA]
    records = domains.generate("graph", split, n, seed=seed)
    gold = [r["meta"]["value"] for r in records]
    say = progress or (lambda msg: None)
    scores, routing = {}, {}
    for c in configs:
        say(f"triples of {c} on {len(records)} held-out passages")
        texts, ids, scalings = generate_answers(model, tokenizer, records, c, max_new_tokens,
                                                record_scalings=c == XLORA)
        scores[c] = score_answers(texts, gold)
        if c == XLORA:
            means = [s.float().mean((0, 1)) for s in scalings if len(s)]  # [E] per passage
            total = sum(means) / max(len(means), 1)
            routing = {"mean_scalings": dict(zip(names, [float(x) for x in total])) if means else {},
                       "top1_graph": sum(names[int(m.argmax())] == "graph" for m in means) / max(len(means), 1)}
    return {"split": split, "n": n, "scores": scores, "routing": routing}


def to_markdown(result: dict[str, Any]) -> str:
    """The F1 table (best F1 in bold) and the routing line."""
    rows = result["scores"]
    best = max(r["f1"] for r in rows.values())
    out = [f"Triples on {result['n']} held-out passages (`{result['split']}`; micro-averaged):\n\n",
           "| model | precision | recall | F1 | triples predicted | malformed lines |\n|---|---:|---:|---:|---:|---:|\n"]
    for c, r in rows.items():
        f1 = f"**{r['f1']:.3f}**" if r["f1"] == best and best > 0 else f"{r['f1']:.3f}"
        out.append(f"| {c} | {r['precision']:.3f} | {r['recall']:.3f} | {f1} | {r['predicted']} / {r['gold']} gold "
                   f"| {r['malformed_lines']} |\n")
    routing = result.get("routing") or {}
    if routing.get("mean_scalings"):
        mix = ", ".join(f"{k} {v:.3f}" for k, v in routing["mean_scalings"].items())
        out.append(f"\nX-LoRA on these prompts: mean scalings over generated tokens {mix}; "
                   f"graph expert top-1 on {routing['top1_graph']:.3f} of the passages.\n")
    return "".join(out)


def write(result: dict[str, Any], out_dir: str | os.PathLike, stem: str = "graph_eval") -> tuple[Path, Path]:
    out = Path(out_dir)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    atomic_write_text(md, to_markdown(result))
    atomic_write_text(js, json.dumps(result, indent=2) + "\n")
    return md, js
