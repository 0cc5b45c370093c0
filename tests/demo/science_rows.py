"""Science rows in the data files' format (:mod:`xlora.demo.sciencedata.molecules` and ``.mechanics``), with
made-up values, for tests that must not depend on the generated data: molecules from the demo's built-in
pool, peptides from a seeded draw, two pulls (seeds) per peptide, a skip line and a torn last line."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from xlora.demo.science import molecule_pool

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def write_rows(folder: Path, n_molecules: int = 400, n_peptides: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with gzip.open(folder / "molecules.jsonl.gz", "wt") as f:
        for i, s in enumerate(molecule_pool()[:n_molecules]):
            homo, lumo = -rng.uniform(8, 12), rng.uniform(-3, 1)
            f.write(json.dumps({"smiles": s, "homo_ev": homo, "lumo_ev": lumo, "gap_ev": lumo - homo,
                                "dipole_debye": rng.uniform(0, 5), "charge": 0,
                                "dG_hyd_kcal_mol": round(rng.uniform(-10, 2), 2) if i % 2 else None,
                                "logS": round(rng.uniform(-6, 1), 2) if i % 3 else None}) + "\n")
        f.write(json.dumps({"key": ["[Na+]"], "skipped": "metal"}) + "\n")
    with open(folder / "peptides.jsonl", "w") as f:
        for _ in range(n_peptides):
            seq = "".join(rng.choice(AMINO) for _ in range(rng.randint(10, 20)))
            for seed in (1, 2):
                f.write(json.dumps({"sequence": seq, "seed": seed, "peak_force_pn": rng.uniform(200, 900),
                                    "work_kj_mol": rng.uniform(50, 400)}) + "\n")
        f.write('{"sequence": "AAAA", "seed": 1, "peak_fo')  # a run file torn mid-line
    return folder


@pytest.fixture(scope="module", name="rows")
def rows_fixture(tmp_path_factory):
    """``rows``: :func:`write_rows` in a fresh folder, as a string; a test module imports ``rows_fixture``."""
    return str(write_rows(tmp_path_factory.mktemp("rows")))
