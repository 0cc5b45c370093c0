"""Does a LoRA expert's *distribution* over a numeric answer know more than its greedy answer? Posterior-mean decoding.

For each forward numeric record (``meta.value``, ``meta.property``) of a JSONL file, with the chat prompt ``p`` and a
PEFT LoRA expert over the demo's base, the answer's sign and integer part are scored as prefixes (SmolLM2 writes
digits one token each, so ``"4."`` and ``"14."`` are disjoint events):

    w(s, k)   = P("{s}{k}." | p)                           s ∈ {"", "-"}, k = 0 … 29
    d̄(s, k)   = E[first decimal | p, "{s}{k}."] / 10 + 0.05
    mean      = Σ w · sign(s)(k + d̄) / Σ w                 mode = the value of the largest w

and prints per property the R² (against the references' mean, as ``xlora.analysis.eval_numeric``) and the
correlation of both, with the median prefix mass ``Σ w`` (how much of the answer's probability the prefixes cover).
One prompt pass with the cache, then one batched pass over the 60 prefixes, per record. BENCHMARKS ("Do the experts
learn the physics?") used it on the suite's quantum expert:

    .venv/bin/python benchmarks/numeric_readout.py src/xlora/demo/assets/suite/experts/quantum QUANTUM_TEST.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

SIGNS = ("", "-")
INTEGERS = 30


def readout(model, tok, record: dict) -> dict:
    """``{"ref", "mean", "mode", "mass"}`` of one record (module doc)."""
    prefixes = [(s, k) for s in SIGNS for k in range(INTEGERS)]
    cand = [tok(f"{s}{k}.", add_special_tokens=False).input_ids for s, k in prefixes]
    width, pad = max(map(len, cand)), tok.pad_token_id or 0
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in cand])  # right-padded: no real token sees a pad
    lens, rows = torch.tensor([len(c) for c in cand]), torch.arange(len(cand))
    digits = [tok.convert_tokens_to_ids(str(i)) for i in range(10)]
    prompt = tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"]
    out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(cand))
    mask = torch.ones(len(cand), prompt.shape[1] + width, dtype=torch.long)
    logp = model(input_ids=ids, past_key_values=cache, attention_mask=mask).logits.log_softmax(-1)  # [C, width, V]
    total = out.logits[0, -1].log_softmax(-1)[ids[:, 0]]
    for j in range(1, width):
        total = total + torch.where(j < lens, logp[rows, j - 1, ids[:, j]], torch.zeros(()))
    decimal = (logp[rows, lens - 1][:, digits].softmax(-1) * torch.arange(10)).sum(-1) / 10 + 0.05
    sign = torch.tensor([-1.0 if s else 1.0 for s, _ in prefixes])
    values = sign * (torch.tensor([float(k) for _, k in prefixes]) + decimal)
    w = total.softmax(0)
    return {"ref": float(record["meta"]["value"]), "mean": float((w * values).sum()), "mode": float(values[w.argmax()]),
            "mass": float(total.exp().sum())}


def report(results: dict[str, list[dict]]) -> list[str]:
    lines = []
    for prop, group in sorted(results.items()):
        y = np.array([r["ref"] for r in group])
        for key in ("mean", "mode"):
            yh = np.array([r[key] for r in group])
            r2 = 1 - ((y - yh) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            lines.append(f"{prop:9s} {key:4s} n={len(group):3d}  R² {r2:6.2f}  corr {np.corrcoef(y, yh)[0, 1]:5.2f}  "
                         f"prefix mass {np.median([r['mass'] for r in group]):.2f}")
    return lines


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlora.demo.base_model import base_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("expert", help="a PEFT LoRA directory over the demo's base")
    p.add_argument("data", help="JSONL records with messages and meta.value / meta.property (others are skipped)")
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(base_model_dir())
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, a.expert).eval()
    results: dict[str, list[dict]] = {}
    with open(a.data, encoding="utf-8") as f, torch.no_grad():
        for line in f:
            rec = json.loads(line)
            meta = rec.get("meta") or {}
            if meta.get("kind") == "numeric" and "property" in meta:
                results.setdefault(meta["property"], []).append(readout(model, tok, rec))
    if not results:
        raise SystemExit(f"{a.data}: no record with meta.kind 'numeric' and meta.property; nothing to read out")
    print("\n".join(report(results)))


if __name__ == "__main__":
    main()
