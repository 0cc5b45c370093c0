"""The science behind the demo's checkers: protein properties (Biopython) and molecules (RDKit).

Both libraries come with the ``demo`` extra and are imported on first use.
"""

from __future__ import annotations

from typing import Any

from xlora.demo._domain_data import MOLECULES, RING_SUBSTITUENTS


def protein_property(seq: str, prop: str) -> float:
    """``mw`` (Da), ``pi``, ``gravy`` or ``instability`` of ``seq`` with Biopython's ``ProteinAnalysis``."""
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    pa = ProteinAnalysis(seq)
    return {"mw": pa.molecular_weight, "pi": pa.isoelectric_point, "gravy": pa.gravy,
            "instability": pa.instability_index}[prop]()


def mol_from_smiles(smiles: str) -> Any:
    """RDKit molecule or ``None`` (RDKit's parse errors are silenced)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem.MolFromSmiles(smiles) if smiles else None


def chem_property(mol: Any, prop: str) -> float:
    """``mw`` (RDKit MolWt), ``logp`` (Crippen), ``rings``, ``hbd`` or ``hba`` of an RDKit molecule."""
    from rdkit.Chem import Crippen, Descriptors, rdMolDescriptors

    return {"mw": Descriptors.MolWt, "logp": Crippen.MolLogP, "rings": rdMolDescriptors.CalcNumRings,
            "hbd": rdMolDescriptors.CalcNumHBD, "hba": rdMolDescriptors.CalcNumHBA}[prop](mol)


_POOL: list[str] | None = None


def molecule_pool() -> list[str]:
    """Canonical SMILES of the built-in molecules and enumerations, sorted (deterministic)."""
    global _POOL
    if _POOL is None:
        from rdkit import Chem

        raw = list(MOLECULES)
        for n in range(1, 11):
            c = "C" * n
            raw += [c, c + "O", c + "N", c + "Cl", c + "C#N", c + "C(=O)O", c + "C=O", "C=C" + c, c + "OC"]
            raw += [f"C{'C' * k}C(=O){'C' * (n - k)}" for k in range(n)]
        for x in RING_SUBSTITUENTS:
            raw += [f"c1({x})ccccc1", f"c1({x})ccccn1", f"c1({x})cccnc1", f"c1({x})ccncc1", f"C1({x})CCCCC1",
                    f"C1({x})CCCC1", f"c1({x})ccc2ccccc2c1", f"c1({x})ccc(-c2ccccc2)cc1"]
            for y in RING_SUBSTITUENTS:
                raw += [f"c1({x})c({y})cccc1", f"c1({x})cc({y})ccc1", f"c1({x})ccc({y})cc1"]
        _POOL = sorted({Chem.MolToSmiles(m) for m in map(mol_from_smiles, raw) if m is not None})
    return _POOL
