"""Two held-out science questions the demo asks X-LoRA, each answer checked against the physics behind it.

- **quantum**: the GFN2-xTB HOMO-LUMO gap (eV) of a held-out molecule: the first ``test``-split molecule (in
  SMILES order) of the ChEMBL approved-drug set, asked in the ``qm_forward`` task's seen wording
  (:mod:`xlora.demo.wording`, as the suite's ``test`` split asks it). The reference is computed *live* by the
  data's own pipeline (:func:`xlora.demo.sciencedata.molecules.compute`: RDKit ETKDGv3 + MMFF94, then a tblite
  single point); without ``tblite`` (the ``science`` extra) the value recorded in ``molecules.jsonl.gz`` is
  used instead, and said so. ChEMBL's SMILES are canonical, so the live run embeds the same atom order as the
  data run and reproduces the recorded gap to 1e-6 eV (a FreeSolv molecule such as ``BrCCBr`` was embedded
  from its source's atom order and can differ by up to 0.06 eV).
- **mechanics**: the steered-MD peak force (pN) of a held-out peptide (the first ``test``-split sequence), in
  the ``mech_forward`` seen wording, against the mean of its recorded OpenMM pulls (a live pull costs 10-20 s,
  too long for the demo).

The answer's number is the first number not glued to a letter (``"The gap is 4.52 eV"`` -> 4.52; a SMILES's
ring digits are skipped). It is scored like every numeric demo answer (:func:`xlora.demo.domains.check`):
``max(0, 1 - |pred - ref| / tol)``, 1 within half a unit of the last asked decimal, where ``tol`` is twice
the suite's check tolerance (0.6 eV for the gap, 30 % of the force). No number scores 0.
"""

from __future__ import annotations

import importlib.util
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlora.demo import domains, science_tasks, suite, wording
from xlora.demo.evaluate import XLORA, generate_answers
from xlora.demo.sciencedata.store import read_jsonl

MOLECULE_SOURCE = "chembl_drugs"  # canonical SMILES: the live xTB run reproduces the recorded value
ANSWER_TOKENS = 16  # "3.33" is ~4 tokens and the end of turn one more; room for a short sentence
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?![\w.]*\d)")


@dataclass(frozen=True)
class Question:
    """A science question: a suite record (``prompt``, ``completion``, ``meta``: value, unit, decimals,
    ``tol``) with the thing it is about (``name``) and where its recorded value comes from."""

    record: dict[str, Any]
    name: str
    recorded: float
    provenance: str

    @property
    def unit(self) -> str:
        return self.record["meta"]["unit"]


@dataclass(frozen=True)
class Reference:
    """The value an answer is checked against, how it was obtained and, when computed live, in how long."""

    value: float
    how: str
    seconds: float | None = None


@dataclass(frozen=True)
class Checked:
    """A checked answer: the model's ``answer`` text, its parsed ``value`` (None: no number), the
    ``reference``, the absolute ``error`` (None without a value) and the ``score`` in [0, 1]."""

    question: Question
    answer: str
    value: float | None
    reference: Reference
    error: float | None
    score: float


def parse_number(text: str) -> float | None:
    """The first number in ``text`` that is not glued to a letter (a SMILES's ``c1`` is no number), or None.

    ``"The gap is 4.52 eV"`` -> 4.52, ``"-1,234.5 pN"`` -> -1234.5, ``"−0.3"`` (minus sign) -> -0.3.
    """
    if not isinstance(text, str):
        return None
    clean = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.replace("\u2212", "-"))
    m = _NUMBER.search(clean)
    return float(m.group()) if m else None


def score(record: dict[str, Any], value: float | None, reference: float) -> float:
    """The demo's numeric score of ``value`` against ``reference`` (``record["meta"]``'s decimals and tol)."""
    if value is None:
        return 0.0
    meta = {**record["meta"], "value": float(f"{reference:.{record['meta']['decimals']}f}")}
    return domains.check({**record, "meta": meta}, f"{value:f}")


def _record(domain: str, kind: str, row: dict[str, Any], prop: str, key_field: str) -> dict[str, Any]:
    """A suite ``test`` record asking ``row``'s ``prop``, in the kind's seen wording (seeded: always the same)."""
    props = science_tasks.QM_PROPS if kind == "qm_forward" else science_tasks.MECH_PROPS
    rng = random.Random(f"xlora-demo-question:{kind}")
    item = science_tasks.forward_item(rng, [row], {prop: props[prop]}, kind, key_field)
    words = wording.compose(kind, "test", rng, item.slots)
    return suite.make_record(domain, "test", kind, item, words, f"{domain}-question")


def molecule_question(folder: str | Path | None = None) -> Question:
    """The gap question on the first ``test``-split ChEMBL drug (SMILES order) with a finite gap.

    Raises:
        ValueError: the science data under ``folder`` holds no such molecule.
    """
    path = Path(folder or science_tasks.SCIENCE_DIR) / "molecules.jsonl.gz"
    rows = sorted((r for r in read_jsonl(path) if r.get("source") == MOLECULE_SOURCE and "skipped" not in r
                   and science_tasks.finite_value(r.get("gap_ev"))), key=lambda r: r["smiles"])
    row = next((r for r in rows if science_tasks.split_of("quantum", r["smiles"]) == "test"), None)
    if row is None:
        raise ValueError(f"{path} has no test-split {MOLECULE_SOURCE} molecule with a gap_ev; regenerate the data "
                         "(python -m xlora.demo.sciencedata molecules, then pack)")
    record = _record("quantum", "qm_forward", {"smiles": row["smiles"], "gap": row["gap_ev"]}, "gap", "smiles")
    return Question(record, row.get("name") or row["smiles"], row["gap_ev"],
                    f"GFN2-xTB value recorded in {path.name}")


def peptide_question(folder: str | Path | None = None) -> Question:
    """The peak-force question on the first ``test``-split peptide (sequence order) of the recorded pulls.

    Raises:
        ValueError: the science data under ``folder`` holds no test-split peptide.
    """
    pools = science_tasks.load_pools(str(folder) if folder else None)
    row = next((r for r in pools.rows("mech_forward") if science_tasks.split_of("mechanics", r["sequence"]) == "test"),
               None)
    if row is None:
        raise ValueError(f"the science data in {folder or science_tasks.SCIENCE_DIR} has no test-split peptide; "
                         "run more pulls (python -m xlora.demo.sciencedata mechanics, then pack)")
    record = _record("mechanics", "mech_forward", row, "force", "sequence")
    pulls = f"{row['seeds']} recorded OpenMM pull" + ("s" if row["seeds"] > 1 else "")
    return Question(record, row["sequence"], row["force"], f"mean of {pulls} (steered MD)")


def has_tblite() -> bool:
    """Whether GFN2-xTB can run here (``tblite``, from the ``science`` extra)."""
    return importlib.util.find_spec("tblite") is not None


def reference(question: Question, live: bool = True) -> Reference:
    """The value to check against: for the gap, GFN2-xTB computed now (timed) when ``live`` and tblite is
    installed, else the recorded value (the reason said); for the force, the recorded pulls."""
    if question.record["kind"] != "qm_forward" or not live:
        return Reference(question.recorded, question.provenance)
    if not has_tblite():
        return Reference(question.recorded, f"{question.provenance} (tblite is not installed, so xTB was not "
                                            "re-run: pip install tblite)")
    from xlora.demo.sciencedata import molecules

    t0 = time.perf_counter()
    try:
        value = molecules.compute(question.record["item"])["gap_ev"]
    except molecules.Skip as exc:
        return Reference(question.recorded, f"{question.provenance} (the live xTB run failed: {exc})")
    return Reference(value, "GFN2-xTB computed now (RDKit ETKDG + MMFF94, tblite)", time.perf_counter() - t0)


def check(question: Question, answer: str, ref: Reference) -> Checked:
    """Parse and score ``answer`` against ``ref``."""
    value = parse_number(answer)
    error = None if value is None else abs(value - ref.value)
    return Checked(question, answer, value, ref, error, score(question.record, value, ref.value))


def ask(model: Any, tokenizer: Any, questions: list[Question], live: bool = True,
        max_new_tokens: int = ANSWER_TOKENS) -> tuple[list[Checked], list[list[int]], list[Any]]:
    """X-LoRA's greedy answers to ``questions`` (one batch), checked.

    Returns ``(checked, new_token_ids, scalings)``; ``scalings[i]`` is ``[n_new_i, L, E]`` (the mixture that
    wrote each answer token), for the routing views.
    """
    texts, ids, scalings = generate_answers(model, tokenizer, [q.record for q in questions], XLORA, max_new_tokens,
                                            record_scalings=True)
    return [check(q, t, reference(q, live)) for q, t in zip(questions, texts)], ids, scalings


def describe(c: Checked) -> str:
    """Lines for the console: the reference, the model's number, the error and the score."""
    q, unit = c.question, c.question.unit
    took = f" in {c.reference.seconds:.2f} s" if c.reference.seconds is not None else ""
    got = "no number (unparsable): score 0" if c.value is None else \
        f"{c.value:g} {unit}, |error| {c.error:.3g} {unit}, score {c.score:.2f}"
    return f"  reference: {c.reference.value:.{q.record['meta']['decimals']}f} {unit} — {c.reference.how}{took}\n" \
           f"  model:     {got}"
