"""Protein mechanics from physics: constant-velocity steered MD of α-helical peptides (OpenMM).

A peptide is built as an ideal α-helix (PeptideBuilder, φ=-57°, ψ=-47°, C-terminal OXT), protonated
at pH 7 (``Modeller.addHydrogens``), parametrised with Amber14 in GBn2 implicit solvent (no cutoff,
H-bond constraints, hydrogen mass 1.5 amu) and energy-minimised. A harmonic spring joins the first
and last Cα atoms::

    U(r) = ½ k (r - r0(t))²,   r0(t) = r_start + v t

Its rest length moves at constant speed ``v`` until it has grown by ``extension``. The spring's
force on the termini is ``F = k (r0 - r)`` (positive = pulling apart) and the external work is
``W = Σ F · Δr0`` over the moves of ``r0``. Recorded per pull (one JSON object per line)::

    {"sequence": str, "seed": int,
     "peak_force_pn": float,      # max F over the pull, piconewton
     "work_kj_mol": float,        # W, kJ/mol
     "speed_nm_per_ps": float, "extension_nm": float, "steps": int,   # the protocol
     "spring_kj_mol_nm2": float, "timestep_fs": float, "temperature_k": float,
     "n_atoms": int, "wall_s": float, "cpu_s": float,   # cost: wall clock and this process's CPU time
     "retry_seed": int}           # only when the first seed blew up and seed + 1000 was used

Deterministic for a fixed seed on the Reference platform and on the CPU platform with a fixed
thread count (the hydrogens OpenMM adds start from seeded random positions; the seed drives the
initial velocities and the Langevin noise).
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import asdict, dataclass

KJ_MOL_NM_TO_PN = 1.66053907  # 1 kJ/mol/nm per molecule, in piconewton
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@dataclass(frozen=True)
class PullProtocol:
    """The steered-MD protocol; the defaults cost ≈ 10–20 s per 15-residue pull on one CPU thread.

    Attributes:
        speed_nm_per_ps: how fast the spring's rest length grows.
        extension_nm: how far it grows; the pull takes ``extension / speed`` ps.
        spring_kj_mol_nm2: the spring constant ``k``.
        timestep_fs: Langevin step (4 fs is safe with H-bond constraints and 1.5 amu hydrogens).
        temperature_k: Langevin bath temperature.
        friction_per_ps: Langevin friction.
        equilibration_steps: steps with the spring at rest before pulling.
        minimize_iterations: at most this many L-BFGS iterations of energy minimisation.
        chunk_steps: steps between moves of ``r0`` (and force samples).
        platform: OpenMM platform name (``CPU`` or ``Reference``).
        threads: CPU threads (ignored on Reference).
    """

    speed_nm_per_ps: float = 0.5
    extension_nm: float = 0.8
    spring_kj_mol_nm2: float = 1000.0
    timestep_fs: float = 4.0
    temperature_k: float = 300.0
    friction_per_ps: float = 1.0
    equilibration_steps: int = 100
    minimize_iterations: int = 50
    chunk_steps: int = 5
    platform: str = "CPU"
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("speed_nm_per_ps", "extension_nm", "spring_kj_mol_nm2", "timestep_fs", "temperature_k",
                     "friction_per_ps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"PullProtocol.{name}={value!r}: must be a positive number")
        for name in ("equilibration_steps", "minimize_iterations", "chunk_steps", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name[0] in "em" else 1):
                raise ValueError(f"PullProtocol.{name}={value!r}: must be a non-negative integer (chunk_steps, "
                                 "threads at least 1)")
        if self.platform not in ("CPU", "Reference"):
            raise ValueError(f"PullProtocol.platform={self.platform!r}: use 'CPU' or 'Reference'")

    @property
    def pull_steps(self) -> int:
        """Steps of the pull itself, rounded up to whole chunks."""
        steps = self.extension_nm / self.speed_nm_per_ps / (self.timestep_fs * 1e-3)
        return self.chunk_steps * math.ceil(round(steps, 6) / self.chunk_steps)


class SimulationFailed(RuntimeError):
    """The integrator blew up (NaN coordinates or energy)."""


class OverBudget(RuntimeError):
    """The pull ran past its time budget and was stopped."""


def check_sequence(seq: str) -> str:
    """The upper-cased sequence, or ValueError naming the bad letters."""
    if not isinstance(seq, str) or not seq.strip():
        raise ValueError(f"peptide sequence {seq!r}: give one-letter amino-acid codes, e.g. 'AEAAAKEAAAKA'")
    seq = seq.strip().upper()
    bad = sorted(set(seq) - set(AMINO_ACIDS))
    if bad:
        raise ValueError(f"peptide sequence {seq!r} has letters {''.join(bad)} that are not among the 20 standard "
                         f"amino acids ({AMINO_ACIDS})")
    return seq


def helix_pdb(seq: str) -> str:
    """PDB text of ``seq`` as an ideal α-helix with a C-terminal OXT (heavy atoms only)."""
    import PeptideBuilder
    from Bio.PDB import PDBIO
    from PeptideBuilder import Geometry

    geos = []
    for aa in check_sequence(seq):
        geo = Geometry.geometry(aa)
        geo.phi, geo.psi_im1 = -57.0, -47.0
        geos.append(geo)
    structure = PeptideBuilder.add_terminal_OXT(PeptideBuilder.make_structure_from_geos(geos))
    out = io.StringIO()
    writer = PDBIO()
    writer.set_structure(structure)
    writer.save(out)
    return out.getvalue()


def build_system(seq: str, protocol: PullProtocol):
    """(topology, positions, system, (first Cα, last Cα)) of the protonated helix in GBn2 solvent."""
    import openmm as mm
    import openmm.app as app
    import openmm.unit as unit

    pdb = app.PDBFile(io.StringIO(helix_pdb(seq)))
    forcefield = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    # addHydrogens starts new hydrogens at positions from the global `random` module: seed it for
    # reproducible structures, and give the caller's generator state back afterwards
    state = random.getstate()
    try:
        random.seed(0)
        # its hydrogen minimisation on Reference: the default (multi-threaded CPU) sums forces in varying order
        modeller.addHydrogens(forcefield, pH=7.0, platform=mm.Platform.getPlatformByName("Reference"))
    finally:
        random.setstate(state)
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds,
                                     hydrogenMass=1.5 * unit.amu)
    cas = [a.index for a in modeller.topology.atoms() if a.name == "CA"]
    return modeller.topology, modeller.positions, system, (cas[0], cas[-1])


def _context(system, positions, protocol: PullProtocol, seed: int):
    import openmm as mm
    import openmm.unit as unit

    integrator = mm.LangevinMiddleIntegrator(protocol.temperature_k * unit.kelvin,
                                             protocol.friction_per_ps / unit.picosecond,
                                             protocol.timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    platform = mm.Platform.getPlatformByName(protocol.platform)
    props = {"Threads": str(protocol.threads)} if protocol.platform == "CPU" else {}
    context = mm.Context(system, integrator, platform, props)
    context.setPositions(positions)
    return context, integrator


def _distance(context, pair: tuple[int, int]) -> float:
    import numpy as np

    pos = context.getState(getPositions=True).getPositions(asNumpy=True)._value  # [atoms, 3] nm
    d = float(np.linalg.norm(pos[pair[1]] - pos[pair[0]]))
    if not math.isfinite(d):
        raise SimulationFailed("NaN coordinates")
    return d


def _add_spring(system, pair: tuple[int, int], k: float) -> int:
    import openmm as mm

    spring = mm.CustomBondForce("0.5*k_pull*(r-r0)^2")
    spring.addGlobalParameter("k_pull", k)
    spring.addGlobalParameter("r0", 0.0)
    spring.addBond(pair[0], pair[1], [])
    return system.addForce(spring)


def pull(seq: str, seed: int, protocol: PullProtocol | None = None, time_budget_s: float | None = None) -> dict:
    """One constant-velocity pull of ``seq``'s termini; the record described in the module docstring.

    Raises:
        SimulationFailed: the simulation produced NaN (the caller may retry with another seed).
        OverBudget: ``time_budget_s`` (wall clock, from the start) ran out before the pull ended.
    """
    import openmm as mm
    import openmm.unit as unit

    protocol = protocol or PullProtocol()
    start, cpu_start = time.perf_counter(), time.process_time()
    _, positions, system, pair = build_system(seq, protocol)
    _add_spring(system, pair, protocol.spring_kj_mol_nm2)
    context, integrator = _context(system, positions, protocol, seed)
    try:
        context.setParameter("r0", _distance(context, pair))
        mm.LocalEnergyMinimizer.minimize(context, 10.0, protocol.minimize_iterations)
        context.setVelocitiesToTemperature(protocol.temperature_k * unit.kelvin, seed)
        r0 = _distance(context, pair)
        context.setParameter("r0", r0)
        integrator.step(protocol.equilibration_steps)
        dr0 = protocol.speed_nm_per_ps * protocol.chunk_steps * protocol.timestep_fs * 1e-3
        peak, work = -math.inf, 0.0
        for _ in range(protocol.pull_steps // protocol.chunk_steps):
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                raise OverBudget(f"stopped after {time.perf_counter() - start:.1f} s > budget {time_budget_s} s")
            force = protocol.spring_kj_mol_nm2 * (r0 - _distance(context, pair))  # kJ/mol/nm
            work += force * dr0
            peak = max(peak, force)
            r0 += dr0
            context.setParameter("r0", r0)
            integrator.step(protocol.chunk_steps)
        force = protocol.spring_kj_mol_nm2 * (r0 - _distance(context, pair))
        peak = max(peak, force)
    except mm.OpenMMException as exc:  # "Particle coordinate is NaN"
        raise SimulationFailed(str(exc)) from exc
    finally:
        del context, integrator
    return {"sequence": check_sequence(seq), "seed": seed, "peak_force_pn": round(peak * KJ_MOL_NM_TO_PN, 4),
            "work_kj_mol": round(work, 4), "speed_nm_per_ps": protocol.speed_nm_per_ps,
            "extension_nm": protocol.extension_nm, "steps": protocol.pull_steps,
            "spring_kj_mol_nm2": protocol.spring_kj_mol_nm2, "timestep_fs": protocol.timestep_fs,
            "temperature_k": protocol.temperature_k, "n_atoms": system.getNumParticles(),
            "wall_s": round(time.perf_counter() - start, 3), "cpu_s": round(time.process_time() - cpu_start, 3)}


def pull_with_retry(seq: str, seed: int, protocol: PullProtocol | None = None) -> tuple[dict | None, str | None]:
    """(record, None), or (None, reason) after a blow-up, retried once with seed + 1000, blows up again."""
    for attempt_seed in (seed, seed + 1000):
        try:
            record = pull(seq, attempt_seed, protocol)
            record["seed"] = seed
            if attempt_seed != seed:
                record["retry_seed"] = attempt_seed
            return record, None
        except SimulationFailed as exc:
            reason = f"nan: {exc}"
    return None, reason


def protocol_dict(protocol: PullProtocol) -> dict:
    """The protocol as plain data (for provenance)."""
    return asdict(protocol)
