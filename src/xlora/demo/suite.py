"""The science suite: seven expert domains on real data, composed wording, item-disjoint splits, JSONL files.

Domains (one LoRA expert each) and their task kinds:

- ``protein``: Biopython ProtParam forward/inverse (weight, pI, GRAVY, instability);
- ``mechanics``: steered-MD peak force / work of peptides, forward and inverse (:mod:`xlora.demo.science_tasks`);
- ``chemistry``: RDKit descriptors (weight, logP, rings, H-bond donors/acceptors), inverse design, and the
  *measured* FreeSolv hydration free energy and aqueous logS;
- ``quantum``: GFN2-xTB gap / HOMO / LUMO / dipole forward, and molecules with a gap in a range (inverse);
- ``mathematics``, ``general``, ``graph``: the demo's tasks of :mod:`xlora.demo.domains`.

Every prompt is composed by :mod:`xlora.demo.wording`: ``train``, ``validation`` and ``test`` from the seen
frame families and alias sets, ``test_unseen`` from the held-out ones only, on items drawn from the
held-out (``test``) item pool. Items are split by a hash of their key in a key space shared across
domains (``molecule`` for chemistry and quantum, ``peptide`` for protein and mechanics), so a test
molecule is unseen by every expert. A record is::

    {"id", "domain", "task", "kind", "split", "item", "prompt", "completion", "template", "family", "frame",
     "wording", "check", "meta"}

``check`` is what ``xlora eval`` compares a generated answer with (``{"exact": true}``, ``{"rel_tol": x}`` or
``{"abs_tol": x}``); ``meta`` is what the demo's own checker needs (:func:`check`: graded numeric scores,
inverse answers re-computed). For inverse kinds ``check`` is exact match with one valid answer (a lower
bound); their real check is the demo's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xlora.demo import domains, phrasings, science_tasks, wording
from xlora.demo.phrasings import Item
from xlora.demo.science_tasks import split_of
from xlora.files import atomic_write_text

DOMAINS = ("protein", "mechanics", "chemistry", "quantum", "mathematics", "general", "graph")
SPLITS = phrasings.SPLITS

Record = dict[str, Any]
SuiteTask = Callable[[random.Random, bool, science_tasks.SciencePools], Item]  # (rng, held_out, pools)


def _old(task: Callable[[random.Random, bool], Item]) -> SuiteTask:
    return lambda rng, held_out, pools: task(rng, held_out)


def _new(task: Callable[[random.Random, science_tasks.SciencePools], Item]) -> SuiteTask:
    return lambda rng, held_out, pools: task(rng, pools)


TASKS: dict[str, list[tuple[str, SuiteTask, float]]] = {  # domain -> (task name, generator, weight)
    "protein": [("protein_forward", _old(domains.protein_forward_task), 0.7),
                ("protein_inverse", _old(domains.protein_inverse_task), 0.3)],
    "mechanics": [("mech_forward", _new(science_tasks.mech_forward), 0.75),
                  ("mech_inverse", _new(science_tasks.mech_inverse), 0.25)],
    "chemistry": [("chem_forward", _old(domains.chem_forward_task), 0.45), ("chem_inverse", _old(domains.chem_inverse_task), 0.2),
                  ("measured", _new(science_tasks.measured), 0.35)],
    "quantum": [("qm_forward", _new(science_tasks.qm_forward), 0.75), ("qm_inverse", _new(science_tasks.qm_inverse), 0.25)],
    "mathematics": [("math", _old(domains.math_task), 1.0)],
    "general": [("general", _old(domains.general_task), 1.0)],
    "graph": [("graph", _old(domains.graph_task), 1.0)],
}

# (kind, property or None) -> xlora eval's check of a numeric/exact answer (tolerances: a good answer's error)
CHECKS: dict[tuple[str, str | None], dict[str, Any]] = {
    ("protein_forward", "mw"): {"rel_tol": 0.02}, ("protein_forward", "pi"): {"abs_tol": 0.5},
    ("protein_forward", "gravy"): {"abs_tol": 0.2}, ("protein_forward", "instability"): {"abs_tol": 10.0},
    ("chem_value", "mw"): {"rel_tol": 0.02}, ("chem_value", "logp"): {"abs_tol": 0.5},
}


def check_spec(item: Item) -> dict[str, Any]:
    """The record's ``check`` for ``xlora eval``."""
    if "check" in item.meta:
        return item.meta["check"]
    return CHECKS.get((item.kind, item.slots.get("prop")), {"exact": True})


def make_record(domain: str, split: str, task: str, item: Item, words: wording.Wording, rid: str) -> Record:
    """A suite record from an item and its wording (a linear equation's answer names the prompt's variable)."""
    completion = item.completion
    if item.kind == "linear":
        completion = completion.replace("x = ", f"{words.parts['v']} = ", 1)
    meta = {k: v for k, v in item.meta.items() if k != "check"}
    return {"id": rid, "domain": domain, "task": task, "kind": item.kind, "split": split, "item": item.key,
            "prompt": words.prompt, "completion": completion, "template": words.template, "family": words.family,
            "frame": words.frame, "wording": words.parts, "check": check_spec(item), "meta": meta}


def generate(domain: str, split: str, n: int, seed: int = 0, data_dir: str | None = None,
             casings: tuple[str, ...] | None = None, wide: bool = False) -> list[Record]:
    """``n`` records of ``domain`` in ``split`` with distinct prompts; a pure function of the arguments and
    the data files (``data_dir``: the science rows' folder, default the shipped one); ``casings`` and ``wide``:
    see :func:`~xlora.demo.wording.compose`.

    Raises:
        ValueError: unknown domain or split, ``n < 0``, missing data rows, or fewer than ``n`` distinct
            records in the split.
    """
    phrasings.check_request(domain, split, n, TASKS)
    pools = science_tasks.load_pools(data_dir)
    rng = random.Random(f"xlora-suite:{seed}:{domain}:{split}")
    names, funcs, weights = zip(*TASKS[domain])
    item_split = "test" if split == "test_unseen" else split
    records: list[Record] = []
    seen: set[str] = set()
    for attempts in itertools.count(1):
        if len(records) == n:
            return records
        if attempts > 100 * n + 10_000:
            raise ValueError(f"only {len(records)} distinct {domain!r} records exist in split {split!r} "
                             f"(asked for n={n}); ask for fewer or add data")
        i = rng.choices(range(len(names)), weights)[0]
        item = funcs[i](rng, item_split == "test", pools)
        if domains.item_split_of(domain, item.key, item_split == "test", split_of) != item_split:
            continue
        words = wording.compose(item.kind, split, rng, item.slots, casings, wide)
        if words.prompt in seen:
            continue
        seen.add(words.prompt)
        records.append(make_record(domain, split, names[i], item, words, f"{domain}-{split}-{seed}-{len(records)}"))
    raise AssertionError("unreachable")


def generate_mixture(split: str, n_per_domain: int, seed: int = 0, domain_names: tuple[str, ...] = DOMAINS,
                     data_dir: str | None = None, casings: tuple[str, ...] | None = None,
                     wide: bool = False) -> list[Record]:
    """``n_per_domain`` records of each domain, interleaved round-robin (domain order fixed)."""
    per = [generate(d, split, n_per_domain, seed, data_dir, casings, wide) for d in domain_names]
    return [recs[i] for i in range(n_per_domain) for recs in per]


def check(record: Record, answer: str, time_budget_s: float = 120.0) -> float:
    """The demo's score of ``answer`` in ``[0, 1]``: :func:`xlora.demo.domains.check` for its kinds; a physics
    inverse answer is computed (:mod:`xlora.demo.sciencedata.checks`: RDKit + GFN2-xTB for a molecule, one
    steered pull within ``time_budget_s`` for a peptide) and scores 1 inside the asked range, falling to 0 one
    range width outside it; an unparsable or uncomputable answer scores 0."""
    meta = record["meta"]
    if meta["kind"] not in ("qm_inverse", "mech_inverse"):
        return domains.check(record, answer)
    from xlora.demo.sciencedata import checks  # RDKit + tblite / OpenMM, imported only here

    if meta["kind"] == "qm_inverse":
        return checks.check_molecule_property(answer, "gap_ev", meta["lo"], meta["hi"]).score
    return checks.check_peptide_force(answer, meta["lo"], meta["hi"], time_budget_s).score


# ------------------------------------------------------------------------------------------- files
SIZES = {"train": 800, "validation": 48, "test": 48, "test_unseen": 48}
COMPOSITE_SIZES = {"composite": 16, "composite_train": 64}  # per composite kind (3 kinds)
HEAD_PER_DOMAIN = 320  # the head's own draw of the train split (another seed than the experts')
# The head's draw takes every casing, ALL CAPS too (the experts' splits and test never see it): on test_unseen,
# where it was held out, a head that had never seen it sent 37 of 42 all-caps mechanics, chemistry and
# mathematics prompts to another expert (capitals read like a peptide sequence). Frames, aliases, verbs,
# nouns, units, contexts and variables stay held out from it. It also draws the composer's wider seen pools
# (``wide``: three more aliases per property, more verbs, contexts, closings and frame families), which lifted
# test_unseen protein routing from 0.71-0.79 (four fits) to 0.77-0.85 (five; BENCHMARKS, "A wider wording").
HEAD_CASINGS = wording.CASINGS
HEAD_WIDE = True
SEED = 0


def training_record(record: Record) -> Record:
    """A record in the trainer's ``messages`` shape, keeping ``domain``, ``check`` and what checkers need."""
    from xlora.demo.evaluate import chat_messages  # the demo's system prompt and chat shape

    keep = ("id", "domain", "experts", "task", "kind", "split", "family", "check", "meta")
    return {"messages": chat_messages(record), **{k: record[k] for k in keep if k in record}}


def write_splits(out_dir: str | Path, sizes: dict[str, int] | None = None, seed: int = SEED,
                 data_dir: str | None = None, domain_names: tuple[str, ...] = DOMAINS) -> dict[str, Any]:
    """Write the suite as JSONL under ``out_dir``: ``<split>/<domain>.jsonl`` (experts train on
    ``train/<domain>``), ``<split>.jsonl`` (all domains interleaved, for ``xlora eval``), ``composite.jsonl``,
    ``composite_train.jsonl`` and ``head_train.jsonl`` (the head's data: its own draw of every domain's train
    split plus ``composite_train``); returns and writes ``manifest.json`` (counts and sha256 per file). A
    domain whose data cannot fill a split yet gets an empty file and a line in ``manifest["missing"]``.
    Files are written atomically."""
    from xlora.demo import composite

    out, sizes = Path(out_dir), {**SIZES, **(sizes or {})}
    files: dict[str, list[Record]] = {}
    missing: dict[str, str] = {}
    for split in SPLITS:
        per = {}
        for d in domain_names:
            try:
                per[d] = generate(d, split, sizes[split], seed, data_dir)
            except ValueError as err:  # a data pool still too small (the slow pulls): written empty, said
                per[d], missing[f"{split}/{d}"] = [], str(err)
        files.update({f"{split}/{d}.jsonl": recs for d, recs in per.items()})
        files[f"{split}.jsonl"] = [recs[i] for i in range(sizes[split]) for recs in per.values() if i < len(recs)]
    for split, n in COMPOSITE_SIZES.items():
        try:
            files[f"{split}.jsonl"] = composite.generate(split, n, seed, data_dir)
        except ValueError as err:
            files[f"{split}.jsonl"], missing[split] = [], str(err)
    head = generate_mixture("train", HEAD_PER_DOMAIN, seed + 1, tuple(d for d in domain_names if files[f"train/{d}.jsonl"]),
                            data_dir, HEAD_CASINGS, HEAD_WIDE)
    # composite records train the head on the LM loss only: routing them by their two-expert labels cost the
    # composite loss (BENCHMARKS, H3 against H5); their domain "composite" names no expert, so no routing target
    files["head_train.jsonl"] = head + [{k: v for k, v in r.items() if k != "experts"}
                                        for r in files["composite_train.jsonl"]]
    manifest: dict[str, Any] = {"seed": seed, "sizes": sizes, "composite_sizes": COMPOSITE_SIZES,
                                "head_per_domain": HEAD_PER_DOMAIN, "head_casings": list(HEAD_CASINGS), "head_wide": HEAD_WIDE,
                                "domains": list(domain_names), "missing": missing, "files": {}}
    for name, records in files.items():
        text = "".join(json.dumps(training_record(r)) + "\n" for r in records)
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        manifest["files"][name] = {"records": len(records), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    pools = science_tasks.load_pools(data_dir)
    manifest["science_rows"] = {"qm": len(pools.qm), "measured": len(pools.measured),
                                "mechanics_sequences": len(pools.mechanics)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """``python -m xlora.demo.suite OUT_DIR [--train N] [--eval N] [--data DIR]``: write the split files."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m xlora.demo.suite", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=SIZES["train"], help="train records per domain")
    p.add_argument("--eval", type=int, default=SIZES["test"], help="validation/test/test_unseen records per domain")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--data", default=None, help="folder of the science *.jsonl.gz rows (default: the shipped one)")
    a = p.parse_args(argv)
    sizes = {"train": a.train, "validation": a.eval, "test": a.eval, "test_unseen": a.eval}
    manifest = write_splits(a.out_dir, sizes, a.seed, a.data)
    for name, info in manifest["files"].items():
        print(f"{info['records']:6d}  {name}")
    print(f"science rows: {manifest['science_rows']}")


if __name__ == "__main__":
    main()
