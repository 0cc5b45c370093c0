"""Scaling heads fitted on cached base states to routing labels *and* a teacher head, in seconds.

Extends ``routing_probe.py`` (routing labels only) with the teacher's scalings wherever the labels say nothing,
and with students that read the first ``k`` decoder layers (issue 22's shallow scaling pass). Per record the
states ``h`` of every position are cached (float16): the base's last hidden state after ``--layers k`` decoder
layers and the final norm — exactly the input ``scaling_pass(layers=k)`` gives the head — with the mask of the
positions that predict completion tokens ("scored", where ``xlora eval`` measures routing). The loss of a fit is

    w_route · mean_records −log p̄[own]  +  w_first · mean_records −log p_1[own]
        +  w_kl · mean_positions KL(p_T(h_full) || p_S(h_k))

``p̄`` = the student's softmax averaged over a labelled record's scored positions (8 records a step), ``p_1`` its
softmax at the first of them (the position that predicts the answer's first token); the KL is
over 1,024 positions a step drawn from ``--kl-positions``: ``unlabelled`` (every position that takes no routing
label: the prompts, and every position of the composite records) or ``all``. AdamW, cosine learning rate.
Routing is scored as ``xlora eval`` scores it (top-1 own domain of ``p̄``) on every evaluation file.

A spec is ``init,w_route,w_kl,steps,lr,wd[,seeds][,first=w_first][,seed=s]``: ``init`` is ``teacher`` (start from its
weights; same depth), ``linear`` or ``mlp`` (fresh); with ``seeds`` = n > 1 the n fits' weights are averaged;
``w_first`` defaults to 0, ``seed`` (the first seed) to 0. Each head is scored twice: top-1 own of ``p̄`` (as ``xlora eval``), and of ``p_1``. BENCHMARKS ("Heads fitted
to labels and a teacher") has the runs.

    .venv/bin/python benchmarks/head_fits.py DATA_H9/head_train.jsonl DATA/test_unseen.jsonl \\
        src/xlora/demo/assets/suite/independent/independent.jsonl DATA/validation.jsonl --cache /tmp/states_all \\
        --specs linear,1,1,1500,2e-3,0.1 --save /tmp/fits          # ~12 min to cache 3,100 records, then seconds
    ... --layers 8 --kl-positions all --specs teacher,1,1,1500,1e-3,0  # a k = 8 student of the shipped head
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from routing_probe import make_head, own_top1, save, shipped_head
from torch import nn

from xlora import XLoraConfig
from xlora.demo.suite import DOMAINS
from xlora.head import head_input

N_LAYERS = 30  # SmolLM2-135M
Record = tuple[torch.Tensor, torch.Tensor, str | None]  # states [n, hidden] fp16, scored mask [n], domain


@torch.no_grad()
def all_states(path: str, cache: Path, layers: int) -> list[Record]:
    """Every record's states after ``layers`` decoder layers and the final norm, cached as
    ``<stem>_<sha256 of the file, 12 hex>_k<layers>.pt`` (a file of the same name with other records misses)."""
    hit = cache / f"{Path(path).stem}_{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]}_k{layers}.pt"
    if hit.exists():
        return torch.load(hit)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlora.demo.base_model import base_model_dir
    from xlora.train.data import tokenize_record
    from xlora.train.losses import scored_positions

    tok = AutoTokenizer.from_pretrained(base_model_dir())
    model = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:layers]  # then the final norm, as XLoraModel.scaling_pass(layers=k)
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        ex, _ = tokenize_record(rec, tok, 192, chat=True)
        pos = scored_positions(torch.tensor([ex.labels]))[0]
        h = model.model(input_ids=torch.tensor([ex.input_ids])).last_hidden_state[0]
        out.append((h.half().clone(), pos.clone(), rec.get("domain")))
    hit.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, hit)
    return out


def with_prefix_mean(records: list[Record]) -> list[Record]:
    """The states as a ``head_prefix_mean`` head reads them: ``[h_t ; mean_{s<=t} h_s]`` (:func:`xlora.head.head_input`)."""
    cfg = XLoraConfig(experts={"x": "x"}, head_prefix_mean=True)
    return [(head_input(cfg, h.float()[None])[0].half(), p, d) for h, p, d in records]


def labelled(records: list[Record]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The scored states of the records that name a suite domain, and their domain indices."""
    keep = [(h.float()[p], DOMAINS.index(d)) for h, p, d in records if d in DOMAINS and p.any()]
    return [s for s, _ in keep], torch.tensor([y for _, y in keep])


@torch.no_grad()
def kl_targets(teacher: nn.Module, full: list[Record], student: list[Record], where: str):
    """``(X, T)``: the student's states at the KL positions and the teacher's softmax there (from the full states)."""
    xs, ts = [], []
    for (ht, pos, d), (hs, _, d_s) in zip(full, student, strict=True):
        assert d == d_s and ht.shape[0] == hs.shape[0], "the two caches hold different records"
        keep = ~pos if (where == "unlabelled" and d in DOMAINS) else torch.ones_like(pos)
        xs.append(hs.float()[keep])
        ts.append(torch.softmax(teacher(ht.float()[keep]), -1))
    return torch.cat(xs), torch.cat(ts)


def fit(init: str, teacher: nn.Module, data, w_route: float, w_kl: float, steps: int, lr: float, wd: float,
        seed: int, w_first: float = 0.0) -> nn.Module:
    (S, y), (X, T) = data
    torch.manual_seed(seed)
    head = copy.deepcopy(teacher) if init == "teacher" else make_head(init, X.shape[-1], len(DOMAINS))
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = torch.zeros(())
        if w_route or w_first:
            idx = torch.randint(len(S), (8,)).tolist()
            probs = [torch.softmax(head(S[i]), -1) for i in idx]
            p = torch.stack([q.mean(0) for q in probs])
            loss = loss + w_route * F.nll_loss(p.clamp_min(1e-9).log(), y[idx])
            if w_first:
                p1 = torch.stack([q[0] for q in probs])
                loss = loss + w_first * F.nll_loss(p1.clamp_min(1e-9).log(), y[idx])
        if w_kl:
            j = torch.randint(len(X), (1024,))
            loss = loss + w_kl * F.kl_div(F.log_softmax(head(X[j]), -1), T[j], reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def averaged(heads: list[nn.Module]) -> nn.Module:
    out = copy.deepcopy(heads[0])
    out.load_state_dict({k: sum(h.state_dict()[k] for h in heads) / len(heads) for k in out.state_dict()})
    return out


def main() -> None:
    from xlora.demo.run import ASSETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train_file")
    ap.add_argument("eval_files", nargs="+")
    ap.add_argument("--cache", type=Path, required=True, help="where the states are kept (by file stem, content hash and k)")
    ap.add_argument("--teacher", type=Path, default=ASSETS / "suite", help="X-LoRA directory of the teacher head")
    ap.add_argument("--layers", type=int, default=N_LAYERS, help="k: the decoder layers the student reads")
    ap.add_argument("--kl-positions", choices=("unlabelled", "all"), default="unlabelled")
    ap.add_argument("--prefix-mean", action="store_true",
                    help="the student also reads the running mean of its states (head_prefix_mean; not with init teacher)")
    ap.add_argument("--specs", nargs="*", default=[], help="init,w_route,w_kl,steps,lr,wd[,seeds][,first=W][,seed=S]")
    ap.add_argument("--heads", nargs="*", default=[], help="X-LoRA directories whose heads to score on the states too")
    ap.add_argument("--save", type=Path, default=None, help="write each spec's head as an X-LoRA directory here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher = shipped_head(str(args.teacher))
    student = all_states(args.train_file, args.cache, args.layers)
    full = student if args.layers == N_LAYERS else all_states(args.train_file, args.cache, N_LAYERS)
    read = with_prefix_mean if args.prefix_mean else (lambda records: records)
    student = read(student)
    data = labelled(student), kl_targets(teacher, full, student, args.kl_positions)
    evals = {Path(f).stem: labelled(read(all_states(f, args.cache, args.layers))) for f in args.eval_files}
    mean = ", prefix mean" if args.prefix_mean else ""
    print(f"k = {args.layers}{mean}; {len(data[0][0])} labelled records, {len(data[1][0])} KL positions "
          f"({args.kl_positions})")
    print("| spec | KL | " + " | ".join(evals) + " |\n|---|---:|" + "---|" * len(evals))

    def row(name: str, head: nn.Module) -> None:
        with torch.no_grad():
            kl = F.kl_div(F.log_softmax(head(data[1][0]), -1), data[1][1], reduction="batchmean").item()
        cells = [", ".join(f"{v:.2f}" for v in own_top1(head, d, len(DOMAINS))) for d in evals.values()]
        print(f"| {name} | {kl:.3f} | " + " | ".join(cells) + " |", flush=True)
        firsts = [", ".join(f"{v:.2f}" for v in own_top1(head, ([s[:1] for s in d[0]], d[1]), len(DOMAINS)))
                  for d in evals.values()]
        print("| (first position) | | " + " | ".join(firsts) + " |", flush=True)

    if not args.prefix_mean:  # the teacher reads the states alone
        row(f"teacher `{args.teacher}`" if args.layers == N_LAYERS else f"teacher's head on k = {args.layers}",
            teacher)
    for d in args.heads:
        row(f"`{d}`", shipped_head(d))
    for spec in args.specs:
        init, w_route, w_kl, steps, lr, wd, *rest = spec.split(",")
        n = [v for v in rest if "=" not in v]
        opts = dict(v.split("=", 1) for v in rest if "=" in v)
        if set(opts) - {"first", "seed"}:
            ap.error(f"spec {spec!r}: unknown option(s) {sorted(set(opts) - {'first', 'seed'})}; use first=W, seed=S")
        w_first, seed0 = float(opts.get("first", 0)), int(opts.get("seed", 0))
        heads = [fit(init, teacher, data, float(w_route), float(w_kl), int(steps), float(lr), float(wd), seed, w_first)
                 for seed in range(seed0, seed0 + (int(n[0]) if n else 1))]
        head = averaged(heads) if len(heads) > 1 else heads[0]
        row(spec, head)
        if args.save:
            save(head, args.save / spec.replace(",", "_"), args.teacher, None if args.layers == N_LAYERS else args.layers,
                 prefix_mean=args.prefix_mean)


if __name__ == "__main__":
    main()
