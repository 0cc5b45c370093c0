"""Does an answer's form follow the routing of the *prompt's* positions? A probe of an X-LoRA directory on a split.

X-LoRA routes every token, the prompt's included: the keys and values the first answer position attends to were
computed with the prompt positions' own scalings. For each record (``p0``: its first scored position, the last
prompt token, which predicts the answer's first token ``y1``; ``own``: the record's domain as an expert):

    head        the head's scalings everywhere (what X-LoRA does)
    prompt=p0   the prompt's positions s < p0 take the scalings of p0 (the head's after reading the whole prompt)
    prompt=own  the prompt's positions take ``own`` alone (one-hot); p0 and the answer keep the head's
    p0=own      only p0 takes ``own`` alone; the prompt keeps the head's
    own         the expert ``own`` alone everywhere

and prints, per domain, the head's mean weight on ``own`` over the prompt and at ``p0``, then per configuration the
NLL of ``y1`` and the share of records whose greedy first token is ``y1``. ``--loss`` also gives each configuration's
loss over every scored token (nats per token, as ``xlora eval``). BENCHMARKS ("The first answer token
follows the prompt's routing") used it on the suite head:

    .venv/bin/python benchmarks/prompt_routing.py src/xlora/demo/assets/suite DATA/test.jsonl --tasks chem_forward
    .venv/bin/python benchmarks/prompt_routing.py src/xlora/demo/assets/suite DATA/validation.jsonl --loss
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from xlora.analysis.eval_numeric import numeric_fit, numeric_group, numeric_markdown
from xlora.demo.base_model import base_model_dir, load_demo
from xlora.train.data import tokenize_record
from xlora.train.losses import scored_positions

CONFIGS = ("head", "prompt=p0", "prompt=own", "p0=own", "own")


def variants(S: torch.Tensor, p0: int, own: int) -> dict[str, torch.Tensor | int | None]:
    """The scalings of each configuration for one record: ``S`` ``[1, t, L, E]`` is the head's."""
    one = torch.zeros_like(S[0, 0])  # [L, E]
    one[:, own] = 1
    at_p0, on_prompt, on_p0 = S.clone(), S.clone(), S.clone()
    at_p0[0, :p0] = S[0, p0]
    on_prompt[0, :p0] = one
    on_p0[0, p0] = one
    return {"head": None, "prompt=p0": at_p0, "prompt=own": on_prompt, "p0=own": on_p0, "own": own}


def tokenized(rec: dict, tok) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``ids`` ``[1, t]``, ``scored`` ``[t]`` (positions that predict a completion token) and ``p0``, the first of them."""
    ex, _ = tokenize_record(rec, tok, 512, chat=True)
    scored = scored_positions(torch.tensor([ex.labels]))[0]
    return torch.tensor([ex.input_ids]), scored, int(scored.nonzero()[0, 0])


@torch.no_grad()
def probe(model, tok, rec: dict, names: list[str], loss: bool) -> dict:
    ids, scored, p0 = tokenized(rec, tok)
    own = names.index(rec["domain"])
    head = model(input_ids=ids)
    S = head.scalings  # [1, t, L, E]
    w = S[0].mean(1)  # [t, E], modules averaged
    row = {"domain": rec["domain"], "prompt_own": float(w[:p0, own].mean()), "p0_own": float(w[p0, own]),
           "nll": {}, "hit": {}, "loss": {}}
    y1 = int(ids[0, p0 + 1])
    for name, spec in variants(S, p0, own).items():
        out = head if spec is None else model(input_ids=ids, scalings=spec)
        logp = out.logits[0].float().log_softmax(-1)  # [t, V]
        row["nll"][name] = -float(logp[p0, y1])
        row["hit"][name] = int(logp[p0].argmax()) == y1
        if loss:
            pos = scored[:-1].nonzero()[:, 0]
            row["loss"][name] = (-float(logp[pos, ids[0, pos + 1]].sum()), len(pos))
    return row


@torch.no_grad()
def greedy(model, tok, rec: dict, prompt_at_p0: bool, max_new_tokens: int = 14) -> str:
    """The greedy answer, recomputing the whole sequence each step (no cache): the head's scalings, or with
    ``prompt_at_p0`` the prompt's positions ``s < p0`` given the scalings of ``p0`` (the last prompt position).
    Not ``model.generate``: its fixed scalings are one mixture per sequence, and this mode needs the head's own
    scalings for the generated tokens with the prompt's replaced."""
    full, _, p0 = tokenized(rec, tok)
    ids = full[0, : p0 + 1].tolist()
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        out = model(input_ids=x)
        if prompt_at_p0:  # a second main pass, with the prompt's scalings replaced
            S = out.scalings.clone()
            S[0, :p0] = S[0, p0]
            out = model(input_ids=x, scalings=S)
        nxt = int(out.logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
    return tok.decode(ids[p0 + 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("split_file")
    ap.add_argument("--tasks", nargs="+", default=None, help="only records of these tasks (default: all)")
    ap.add_argument("--domains", nargs="+", default=None, help="only these domains (default: all)")
    ap.add_argument("--loss", action="store_true", help="also every configuration's loss over the scored tokens")
    ap.add_argument("--generate", action="store_true",
                    help="also greedy answers of the numeric records (head and prompt=p0) and their R² (slow: no cache)")
    ap.add_argument("--out", default=None, help="write every record's row here (JSON)")
    args = ap.parse_args()
    model, tok = load_demo(args.model_dir, base_model_dir())
    names = list(model.xlora_config.experts)
    rows, skipped = [], 0
    for line in Path(args.split_file).read_text().splitlines():
        rec = json.loads(line)
        if (args.tasks and rec.get("task") not in args.tasks) or (args.domains and rec["domain"] not in args.domains):
            continue
        if rec["domain"] not in names:  # e.g. the composite split's: no expert of its own to compare with
            skipped += 1
            continue
        rows.append(dict(probe(model, tok, rec, names, args.loss), id=rec["id"], record=rec))
        if args.generate and numeric_group(rec) is not None:
            rows[-1]["answers"] = {c: greedy(model, tok, rec, c == "prompt=p0") for c in ("head", "prompt=p0")}
    by = collections.defaultdict(list)
    for r in rows:
        by[r["domain"]].append(r)
    print(f"{args.model_dir} on {args.split_file}: {len(rows)} records ({skipped} skipped: no expert of their domain)\n")
    print("| domain | n | own weight: prompt | own weight: p0 | " + " | ".join(f"{c}: NLL(y1), y1 first" for c in CONFIGS)
          + " |\n|---|---:|---:|---:|" + "---:|" * len(CONFIGS))
    for d, rs in by.items():
        cells = [f"{sum(r['nll'][c] for r in rs) / len(rs):.3f}, {sum(r['hit'][c] for r in rs) / len(rs):.2f}"
                 for c in CONFIGS]
        print(f"| {d} | {len(rs)} | {sum(r['prompt_own'] for r in rs) / len(rs):.2f} | "
              f"{sum(r['p0_own'] for r in rs) / len(rs):.2f} | " + " | ".join(cells) + " |")
    if args.loss:
        print("\n| domain | " + " | ".join(f"loss: {c}" for c in CONFIGS) + " |\n|---|" + "---:|" * len(CONFIGS))
        for d, rs in list(by.items()) + [("mixed", rows)]:
            n = sum(r["loss"]["head"][1] for r in rs)
            print(f"| {d} | " + " | ".join(f"{sum(r['loss'][c][0] for r in rs) / n:.3f}" for c in CONFIGS) + " |")
    if args.generate:
        answered = [r for r in rows if "answers" in r]
        print(numeric_markdown({c: {"numeric": numeric_fit([r["record"] for r in answered],
                                                           [r["answers"][c] for r in answered])}
                                for c in ("head", "prompt=p0")}))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
