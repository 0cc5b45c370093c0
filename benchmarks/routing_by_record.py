"""Per-record routing of an X-LoRA directory on a suite split, broken down by the prompt's casing.

For each record: the mean scaling over the positions that predict completion tokens (modules averaged), as
``xlora eval`` computes a domain's routing, and whether its largest expert is the record's own domain. The
table counts own / all per domain for prompts in capitals ("upper": over 90 % of the user turn's letters are
capitals, content slots included) and the rest; ``--out`` writes every record's row (prompt, weights) as JSON.
BENCHMARKS ("Where test_unseen's misrouting came from") used it on the suite heads.

    .venv/bin/python benchmarks/routing_by_record.py src/xlora/demo/assets/suite DATA/test_unseen.jsonl \
        --domains protein mechanics chemistry mathematics            # ~2 min for 192 records on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from xlora.demo.base_model import base_model_dir, load_demo
from xlora.train.data import tokenize_record
from xlora.train.losses import scored_positions


def casing(text: str) -> str:
    letters = [c for c in text if c.isalpha()]
    return "upper" if letters and sum(c.isupper() for c in letters) > 0.9 * len(letters) else "other"


@torch.no_grad()
def rows_of(model_dir: str, split_file: str, domains: list[str] | None) -> list[dict]:
    model, tok = load_demo(model_dir, base_model_dir())
    names = list(model.xlora_config.experts)
    out = []
    for line in Path(split_file).read_text().splitlines():
        rec = json.loads(line)
        if domains and rec["domain"] not in domains:
            continue
        ex, _ = tokenize_record(rec, tok, 192, chat=True)
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        weights = model(input_ids=ids).scalings[0].mean(1)[scored_positions(labels)[0]].mean(0)  # [E]
        user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
        out.append({"id": rec["id"], "domain": rec["domain"], "kind": rec.get("kind"), "casing": casing(user),
                    "top": names[int(weights.argmax())], "weights": dict(zip(names, weights.tolist())),
                    "prompt": user})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("split_file")
    ap.add_argument("--domains", nargs="+", default=None, help="only these domains (default: all)")
    ap.add_argument("--out", default=None, help="write every record's row here (JSON)")
    args = ap.parse_args()
    rows = rows_of(args.model_dir, args.split_file, args.domains)
    counts = collections.Counter((r["domain"], r["casing"], r["top"] == r["domain"]) for r in rows)
    print("| domain | upper: own / all | other: own / all |\n|---|---:|---:|")
    for d in dict.fromkeys(r["domain"] for r in rows):
        cells = [f"{counts[d, c, True]} / {counts[d, c, True] + counts[d, c, False]}" for c in ("upper", "other")]
        print(f"| {d} | {cells[0]} | {cells[1]} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
