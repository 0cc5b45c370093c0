"""Which scaling head routes unfamiliar wording? Heads fitted to routing labels alone, on cached states, in seconds.

The scaling pass of the demo's X-LoRA is the base model (``scaling_pass_value = 0``), so the head reads the
base's last hidden state at every token. This script caches those states at the positions that predict
completion tokens (one base pass per record), then fits per-token heads on the training file's routing
labels only — ``p̄ = mean over those positions of softmax(head(h_t))``, loss ``-log p̄[own]``, AdamW, batch 8 —
and scores top-1 own-domain routing per domain on every evaluation file, exactly as ``xlora eval`` does
(argmax of ``p̄``). ``--heads DIR ...`` scores existing X-LoRA directories' heads on the same states: on the
shipped suite head it reproduces ``xlora eval``'s routing, which checks the cache.

No language-model loss: it asks what the states allow, not what a head trained with the mixture learns.
BENCHMARKS ("Routing-only heads on cached states") used it to choose the suite head's depth and weights.

    .venv/bin/python benchmarks/routing_probe.py DATA_H9/head_train.jsonl DATA/test_unseen.jsonl \
        src/xlora/demo/assets/suite/independent/independent.jsonl --heads src/xlora/demo/assets/suite \
        --cache /tmp/states       # ~12 min on 2 cores to cache 2,800 records; each fit then takes seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlora.demo.base_model import base_model_dir
from xlora.demo.suite import DOMAINS
from xlora.train.data import tokenize_record
from xlora.train.losses import scored_positions


@torch.no_grad()
def states(path: str, cache: Path | None) -> tuple[list[torch.Tensor], list[str]]:
    """Per record with a domain expert and a scored position: the base's last hidden states ``[n_i, hidden]`` at
    the positions predicting completion tokens, and its domain (cached under ``cache`` by file stem and content hash)."""
    hit = cache / f"{Path(path).stem}_{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]}.pt" if cache else None
    if hit is not None and hit.exists():
        z = torch.load(hit)
        return z["S"], z["dom"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir())
    model = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32).eval()
    out, domains = [], []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        ex, _ = tokenize_record(rec, tok, 192, chat=True)
        pos = scored_positions(torch.tensor([ex.labels]))[0]
        if not pos.any():
            continue
        out.append(model.model(input_ids=torch.tensor([ex.input_ids])).last_hidden_state[0][pos].clone())
        domains.append(rec.get("domain"))
    if hit is not None:
        hit.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"S": out, "dom": domains}, hit)
    return out, domains


def make_head(kind: str, hidden: int, experts: int) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Linear(hidden, experts))
    return nn.Sequential(nn.Linear(hidden, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, experts))


def fit(data: tuple[list[torch.Tensor], torch.Tensor], kind: str, wd: float, steps: int, seed: int) -> nn.Module:
    """A per-token head trained on ``-log p̄[own]`` only (AdamW, lr 2e-3, batch 8 records)."""
    torch.manual_seed(seed)
    S, y = data
    head = make_head(kind, S[0].shape[-1], len(DOMAINS))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=wd)
    for _ in range(steps):
        idx = torch.randint(len(S), (8,)).tolist()
        p = torch.stack([torch.softmax(head(S[i]), -1).mean(0) for i in idx])
        loss = F.nll_loss(p.clamp_min(1e-9).log(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def own_top1(head: nn.Module, data: tuple[list[torch.Tensor], torch.Tensor], classes: int) -> list[float | None]:
    S, y = data
    pred = torch.stack([torch.softmax(head(s), -1).mean(0) for s in S]).argmax(-1)
    return [float((pred[y == k] == k).float().mean()) if (y == k).any() else None for k in range(classes)]


def shipped_head(model_dir: str) -> nn.Module:
    """The scaling head of an X-LoRA directory as a plain ``nn.Sequential`` (global scalings, softmax)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(model_dir) / "xlora_config.json").read_text())
    assert not cfg["layerwise_scalings"] and cfg["enable_softmax"] and cfg["softmax_temperature"] == 1.0
    assert list(cfg["experts"]) == list(DOMAINS), "the head's experts must be the suite's domains, in order"
    kind = {1: "linear", 2: "mlp"}[cfg["head_depth"]]
    head = make_head(kind, cfg["hidden_size"], len(cfg["experts"]))
    head.load_state_dict({k.removeprefix("layers."): v for k, v in
                          load_file(str(Path(model_dir) / "xlora_head.safetensors")).items()})
    return head.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train_file")
    ap.add_argument("eval_files", nargs="+")
    ap.add_argument("--heads", nargs="*", default=[], help="X-LoRA directories whose heads to score too")
    ap.add_argument("--cache", type=Path, default=None, help="keep the extracted states here (by file stem and content hash)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--wds", type=float, nargs="+", default=[0.0, 0.1, 1.0], help="AdamW weight decays")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--save", type=Path, default=None, help="write the linear fit of the first --wds, seed 0, as an "
                    "X-LoRA directory over the shipped suite's experts (H11 in BENCHMARKS: --wds 0.1)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    def labelled(path: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        S, dom = states(path, args.cache)
        keep = [i for i, d in enumerate(dom) if d in DOMAINS]  # composite records name no expert
        return [S[i] for i in keep], torch.tensor([DOMAINS.index(dom[i]) for i in keep])

    train = labelled(args.train_file)
    evals = {Path(f).stem: labelled(f) for f in args.eval_files}
    cols = ", ".join(d[:4] for d in DOMAINS)
    print("| head | " + " | ".join(f"{e} ({cols})" for e in evals) + " |\n|---|" + "---|" * len(evals))

    def row(name: str, head: nn.Module) -> None:
        cells = [", ".join("–" if v is None else f"{v:.2f}" for v in own_top1(head, d, len(DOMAINS)))
                 for d in evals.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    for d in args.heads:
        row(f"`{d}`", shipped_head(d))
    for kind in ("linear", "mlp"):
        for wd in args.wds:
            for seed in range(args.seeds):
                head = fit(train, kind, wd, args.steps, seed)
                row(f"{kind}, wd {wd:g}, seed {seed}", head)
                if args.save and (kind, wd, seed) == ("linear", args.wds[0], 0):
                    save(head, args.save)


def save(head: nn.Module, out: Path, like: Path | None = None, layers: int | None = None,
         prefix_mean: bool = False) -> None:
    """``head`` (a ``make_head`` Sequential) as an X-LoRA directory: the config of ``like`` (default: the shipped
    suite) with ``head_depth`` = its Linear layers, ``scaling_pass_layers = layers`` and ``head_prefix_mean``, the
    experts by absolute path."""
    from safetensors.torch import save_file

    from xlora.demo.run import ASSETS

    like = like or ASSETS / "suite"
    cfg = json.loads((like / "xlora_config.json").read_text())
    cfg["head_depth"] = sum(isinstance(m, nn.Linear) for m in head)
    cfg["scaling_pass_layers"] = layers
    cfg["head_prefix_mean"] = prefix_mean
    cfg["experts"] = {d: str((like / p).resolve()) for d, p in cfg["experts"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "xlora_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(out / "xlora_head.safetensors"))


if __name__ == "__main__":
    main()
