"""Generate the science data: ``python -m xlora.demo.sciencedata {molecules,mechanics,pack} [--resume]``.

``molecules`` and ``mechanics`` append to run files under ``--runs`` (default ``/work/runs/science``;
resumable, one JSON object per line, skips recorded with their reason); ``pack`` writes the shipped
``.jsonl.gz`` files and ``mechanics_noise.json`` into ``--assets`` from whatever the runs hold so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from xlora.demo.sciencedata import store

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "science"
RUNS = Path("/work/runs/science")
NOISE_SEQUENCES = 20
NOISE_SEEDS = (1, 2, 3)


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", flush=True)


def run_mechanics(args: argparse.Namespace) -> None:
    from xlora.demo.sciencedata.mechanics import PullProtocol, pull_with_retry
    from xlora.demo.sciencedata.peptides import sequences

    protocol = PullProtocol(threads=1)
    run = store.RunFile(Path(args.runs) / "peptides.jsonl", key=lambda r: (r["sequence"], r["seed"]),
                        resume=args.resume)
    # the noise set first (every seed), then one seed for the rest
    seqs = [s for s, _ in sequences(args.n)]
    jobs = [(s, seed) for s in seqs[:NOISE_SEQUENCES] for seed in NOISE_SEEDS]
    jobs += [(s, NOISE_SEEDS[0]) for s in seqs[NOISE_SEQUENCES:]]
    todo = [j for j in jobs if j not in run.done]
    _log(f"mechanics: {len(jobs)} pulls, {len(jobs) - len(todo)} done, protocol {protocol}")
    for i, (seq, seed) in enumerate(todo):
        record, reason = pull_with_retry(seq, seed, protocol)
        if record is None:
            run.skip((seq, seed), reason)
            _log(f"skip {seq} seed {seed}: {reason}")
        else:
            run.add(record)
            _log(f"{i + 1}/{len(todo)} {seq} seed {seed}: peak {record['peak_force_pn']} pN, work "
                 f"{record['work_kj_mol']} kJ/mol, {record['wall_s']} s wall, {record['cpu_s']} s cpu")
    run.close()


def run_molecules(args: argparse.Namespace) -> None:
    from xlora.demo.sciencedata.molecules import run as run_mols

    run_mols(Path(args.runs) / "molecules.jsonl", resume=args.resume, workers=args.workers, limit=args.n, log=_log)


def run_pack(args: argparse.Namespace) -> None:
    from xlora.demo.sciencedata.peptides import noise_summary
    from xlora.files import atomic_write_text  # imports torch: only when packing

    assets, runs = Path(args.assets), Path(args.runs)
    summary: dict = {}
    mols, mol_skips = store.records_and_skips(runs / "molecules.jsonl")
    if mols:
        n = store.pack(mols, assets / "molecules.jsonl.gz", sort_key=lambda r: (r["source"], r["smiles"]))
        summary["molecules"] = {"records": n, "skipped": mol_skips}
    peps, pep_skips = store.records_and_skips(runs / "peptides.jsonl")
    if peps:
        n = store.pack(peps, assets / "peptides.jsonl.gz", sort_key=lambda r: (r["sequence"], r["seed"]))
        noise = noise_summary(peps)
        noise["skipped"] = pep_skips
        noise["cpu_s_per_pull"] = round(sum(r["cpu_s"] for r in peps) / len(peps), 2)
        noise["wall_s_per_pull"] = round(sum(r["wall_s"] for r in peps) / len(peps), 2)
        atomic_write_text(assets / "mechanics_noise.json", json.dumps(noise, indent=1, sort_keys=True, allow_nan=False) + "\n")
        summary["peptides"] = {"records": n, "skipped": pep_skips}
    if (assets / "PROVENANCE.md").exists():
        _write_counts(assets / "PROVENANCE.md", summary, mols, peps)
    print(json.dumps(summary, indent=1))


COUNTS_MARK = "<!-- counts: written by `python -m xlora.demo.sciencedata pack` -->"


def _write_counts(path: Path, summary: dict, mols: list[dict], peps: list[dict]) -> None:
    """Replace everything after COUNTS_MARK in PROVENANCE.md with the packed files' counts and noise."""
    from xlora.files import atomic_write_text

    lines = [COUNTS_MARK, "", f"Packed {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    if mols:
        by_source = {s: sum(s in r["sources"] for r in mols) for s in sorted({x for r in mols for x in r["sources"]})}
        lines += [f"- molecules: {len(mols)} computed, skipped by reason {summary['molecules']['skipped']}; "
                  f"in each set (a molecule can be in several): {by_source}; with dG_hyd "
                  f"{sum(r['dG_hyd_kcal_mol'] is not None for r in mols)}, with logS "
                  f"{sum(r['logS'] is not None for r in mols)}"]
    if peps:
        noise = json.loads((path.parent / "mechanics_noise.json").read_text())
        lines += [f"- peptides: {len(peps)} pulls of {noise['n_sequences']} sequences, skipped by reason "
                  f"{summary['peptides']['skipped']}; {noise['cpu_s_per_pull']} CPU-s and "
                  f"{noise['wall_s_per_pull']} wall-s per pull on average (one OpenMM thread, machine shared)"]
        for label in ("peak_force_pn", "work_kj_mol"):
            e = noise[label]
            lines += [f"- {label}: mean {e['mean']}, seed SD {e.get('seed_sd')} against SD across sequences "
                      f"{e.get('sequence_sd')} ({noise['n_multi_seed_sequences']} sequences with several seeds; "
                      f"reliability of one pull {e.get('reliability_one_pull')}, of the seed mean "
                      f"{e.get('reliability_seed_mean')}); Pearson r with features {e['correlations']}"]
    text = path.read_text()
    head = text.split(COUNTS_MARK)[0].rstrip("\n")
    atomic_write_text(path, head + "\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xlora.demo.sciencedata", description=__doc__)
    parser.add_argument("command", choices=["molecules", "mechanics", "pack"])
    parser.add_argument("--resume", action="store_true", help="continue the run file, skipping done keys")
    parser.add_argument("--runs", default=str(RUNS), help="folder of the resumable run files")
    parser.add_argument("--assets", default=str(ASSETS), help="folder of the packed data files")
    parser.add_argument("--n", type=int, default=None, help="molecules: at most this many; mechanics: sequences")
    parser.add_argument("--workers", type=int, default=1, help="molecules: worker processes (at most 1 here)")
    args = parser.parse_args(argv)
    if args.command == "mechanics" and args.n is None:
        args.n = 300
    {"molecules": run_molecules, "mechanics": run_mechanics, "pack": run_pack}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
