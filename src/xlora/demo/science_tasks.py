"""The physics task kinds of the science suite, over the computed and measured data files.

Rows come from ``xlora/demo/assets/science/*.jsonl.gz`` (see ``PROVENANCE.md`` there and the modules of
:mod:`xlora.demo.sciencedata`; ``*.jsonl`` run files are read too), once per folder; a row is classified by
its fields (:mod:`xlora.demo.sciencedata.molecules` and ``.mechanics`` document them):

- quantum (GFN2-xTB): SMILES -> HOMO-LUMO gap, HOMO, LUMO (eV) and dipole moment (debye);
- measured: SMILES -> FreeSolv hydration free energy (kcal/mol) or aqueous solubility logS (log mol/L);
- mechanics (OpenMM steered MD): sequence -> peak force (pN) and work (kJ/mol), averaged over the seeds
  of one sequence.

Kinds: ``qm_forward``, ``measured``, ``mech_forward`` (numeric answers) and ``qm_inverse`` ("a molecule
with a gap in [lo, hi]"), ``mech_inverse`` ("a peptide of n residues with a peak force in [lo, hi]"), whose
reference completion is the row's own molecule or sequence (a valid answer) and whose real check simulates
the answer (:mod:`xlora.demo.sciencedata`). An item's key is its molecule or sequence, so a molecule is
held out in every domain at once (:mod:`xlora.demo.suite`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlora.demo.phrasings import Item
from xlora.demo.sciencedata.store import read_jsonl

SCIENCE_DIR = Path(__file__).parent / "assets" / "science"

# Items are split by a hash of their key in a key space shared across domains: a test molecule is unseen by every
# expert (the suite and its composite tasks split the same way).
KEY_SPACE = {"protein": "peptide", "mechanics": "peptide", "chemistry": "molecule", "quantum": "molecule"}
_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}  # of 20


def split_of(domain: str, key: str) -> str:
    """The split of an item: 80 % train, 10 % validation, 10 % test by ``sha256(<key space>:<key>)``."""
    space = KEY_SPACE.get(domain, domain)
    bucket = int(hashlib.sha256(f"suite:{space}:{key}".encode()).hexdigest()[:8], 16) % 20
    return next(s for s, r in _BUCKETS.items() if bucket in r)


# property -> (candidate field names in the rows, unit, decimals, check)
QM_PROPS = {"gap": (("gap_ev",), "eV", 2, {"abs_tol": 0.3}), "homo": (("homo_ev",), "eV", 2, {"abs_tol": 0.3}),
            "lumo": (("lumo_ev",), "eV", 2, {"abs_tol": 0.3}), "dipole": (("dipole_debye",), "D", 2, {"abs_tol": 0.5})}
MEASURED_PROPS = {"hydration": (("dG_hyd_kcal_mol",), "kcal/mol", 2, {"abs_tol": 1.0}),
                  "logs": (("logS",), "log(mol/L)", 2, {"abs_tol": 0.7})}
MECH_PROPS = {"force": (("peak_force_pn",), "pN", 0, {"rel_tol": 0.15}),
              "work": (("work_kj_mol",), "kJ/mol", 1, {"rel_tol": 0.2})}
_SMILES_FIELDS = ("smiles",)


@dataclass
class SciencePools:
    """The rows of the science data files, by kind (sorted, so draws are deterministic)."""

    qm: list[dict[str, Any]] = field(default_factory=list)
    measured: list[dict[str, Any]] = field(default_factory=list)
    mechanics: list[dict[str, Any]] = field(default_factory=list)
    force_spread: float = 0.0

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """The rows a task kind draws from; an empty pool is an error naming the files to generate."""
        pool = {"qm_forward": self.qm, "qm_inverse": self.qm, "measured": self.measured,
                "mech_forward": self.mechanics, "mech_inverse": self.mechanics}[kind]
        if not pool:
            raise ValueError(f"task kind {kind!r} has no data rows; generate the science data files into "
                             f"{SCIENCE_DIR} (see xlora.demo.sciencedata) or pass the folder that holds them")
        return pool


def finite_value(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if row.get(n) is not None), None)


def _read_rows(folder: Path) -> list[dict[str, Any]]:
    paths = sorted(folder.glob("*.jsonl.gz")) + sorted(folder.glob("*.jsonl"))
    return [row for path in paths for row in read_jsonl(path)]  # a run file's torn last line is dropped


@functools.lru_cache(maxsize=4)
def load_pools(folder: str | None = None) -> SciencePools:
    """The science rows under ``folder`` (default: the shipped ``assets/science``), classified and cleaned:
    rows without a SMILES/sequence or without a finite value are skipped; mechanics rows of one sequence
    are averaged over their seeds."""
    pools, pulls = SciencePools(), {}
    for row in _read_rows(Path(folder) if folder else SCIENCE_DIR):
        smiles = _field(row, _SMILES_FIELDS)
        if "skipped" in row:  # a skipped input, recorded with its reason
            continue
        if finite_value(row.get("peak_force_pn")) and row.get("sequence"):
            pulls.setdefault(row["sequence"], []).append(row)
            continue
        qm = {p: _field(row, spec[0]) for p, spec in QM_PROPS.items()}
        if smiles and all(finite_value(v) for v in qm.values()):  # a molecule row carries xTB and measured values
            pools.qm.append({"smiles": smiles, **qm})
        measured = {p: _field(row, spec[0]) for p, spec in MEASURED_PROPS.items()}
        if smiles and any(finite_value(v) for v in measured.values()):
            pools.measured.append({"smiles": smiles, **{p: v if finite_value(v) else None for p, v in measured.items()}})
    for seq, rs in pulls.items():
        vals = {p: [r[spec[0][0]] for r in rs if finite_value(r.get(spec[0][0]))] for p, spec in MECH_PROPS.items()}
        if all(vals.values()):
            pools.mechanics.append({"sequence": seq, "seeds": len(rs), **{p: sum(v) / len(v) for p, v in vals.items()}})
    for name in ("qm", "measured", "mechanics"):
        getattr(pools, name).sort(key=lambda r: r.get("smiles") or r["sequence"])
    forces = sorted(r["force"] for r in pools.mechanics)
    pools.force_spread = forces[int(0.9 * (len(forces) - 1))] - forces[int(0.1 * (len(forces) - 1))] if forces else 0.0
    return pools


def _numeric(value: float, decimals: int) -> tuple[str, float]:
    text = f"{value:.{decimals}f}"
    text = text[1:] if text.startswith("-") and float(text) == 0 else text
    return text, float(text)


def forward_item(rng: random.Random, rows: list[dict[str, Any]], props: dict, kind: str, key_field: str) -> Item:
    while True:  # a row may lack one property (a molecule with only logS): draw again
        row, prop = rng.choice(rows), rng.choice(sorted(props))
        if row.get(prop) is not None:
            break
    _, unit, decimals, check = props[prop]
    text, value = _numeric(float(row[prop]), decimals)
    meta = {"kind": "numeric", "value": value, "decimals": decimals, "property": prop, "unit": unit,
            "tol": 2 * next(iter(check.values())) * (abs(value) if "rel_tol" in check else 1.0)}
    slots = {"x": row[key_field], "prop": prop, "unit": unit, "decimals": decimals}
    return Item(row[key_field], kind, slots, text, {**meta, "check": check})


def qm_forward(rng: random.Random, pools: SciencePools) -> Item:
    """SMILES -> gap, HOMO, LUMO or dipole (xTB)."""
    return forward_item(rng, pools.rows("qm_forward"), QM_PROPS, "qm_forward", "smiles")


def measured(rng: random.Random, pools: SciencePools) -> Item:
    """SMILES -> measured hydration free energy or logS."""
    return forward_item(rng, pools.rows("measured"), MEASURED_PROPS, "measured", "smiles")


def mech_forward(rng: random.Random, pools: SciencePools) -> Item:
    """Sequence -> steered-MD peak force or work (mean over seeds)."""
    return forward_item(rng, pools.rows("mech_forward"), MECH_PROPS, "mech_forward", "sequence")


def _range(rng: random.Random, value: float, width: float, decimals: int) -> tuple[float, float]:
    lo = round(value - rng.uniform(0.1, 0.9) * width, decimals)
    return lo, round(lo + width, decimals)


def qm_inverse(rng: random.Random, pools: SciencePools) -> Item:
    """A molecule with a HOMO-LUMO gap in ``[lo, hi]`` eV (1 eV wide, around a real molecule's gap)."""
    row = rng.choice([r for r in pools.rows("qm_inverse") if r.get("gap") is not None])
    lo, hi = _range(rng, float(row["gap"]), 1.0, 1)
    slots = {"prop": "gap", "unit": "eV", "lo": f"{lo:g}", "hi": f"{hi:g}"}
    meta = {"kind": "qm_inverse", "property": "gap", "lo": lo, "hi": hi, "unit": "eV", "check": {"exact": True}}
    return Item(row["smiles"], "qm_inverse", slots, row["smiles"], meta)


def mech_inverse(rng: random.Random, pools: SciencePools) -> Item:
    """A peptide of the row's length with a peak force in ``[lo, hi]`` pN (a quarter of the data's spread)."""
    row = rng.choice(pools.rows("mech_inverse"))
    width = max(10.0, round(pools.force_spread / 4, -1))
    lo, hi = _range(rng, float(row["force"]), width, 0)
    n = len(row["sequence"])
    slots = {"prop": "force", "unit": "pN", "lo": f"{lo:g}", "hi": f"{hi:g}", "n": n}
    meta = {"kind": "mech_inverse", "property": "force", "lo": lo, "hi": hi, "length": n, "unit": "pN",
            "check": {"exact": True}}
    return Item(row["sequence"], "mech_inverse", slots, row["sequence"], meta)
