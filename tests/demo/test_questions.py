"""The demo's two science questions: the answer parser and score, the held-out choices, the live xTB reference
(skipped without tblite) and the asking on a tiny model scripted (:mod:`scripted`) to answer with fixed text."""

from __future__ import annotations

import pytest
import torch
from conftest import GPT2_TARGETS, make_expert, tiny_tokenizer
from scripted import script_answers, scripted_model

from xlora import XLoraConfig, XLoraModel
from xlora.demo import questions, science_tasks, wording
from xlora.demo.evaluate import chat_messages
from xlora.demo.questions import Reference, check, molecule_question, parse_number, peptide_question, reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, value", [
    ("The gap is 4.52 eV", 4.52), ("4.52", 4.52), ("-1,234.5 pN", -1234.5), ("\u22120.3 eV", -0.3),
    ("gap of c1ccccc1 is 3.1 eV.", 3.1), ("C1CC1: 7", 7.0), ("about .5", 0.5), ("1e-3", 0.001), ("415.", 415.0)])
def test_parse_number_finds_the_first_free_standing_number(text, value):
    assert parse_number(text) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("text", ["no idea", "", "c1ccccc1", "CCO", "H2O", None])
def test_parse_number_of_an_answer_without_a_number_is_none(text):
    assert parse_number(text) is None


def test_check_scores_like_the_demo_and_garbage_scores_zero():
    q = molecule_question()
    meta = q.record["meta"]
    assert (meta["unit"], meta["decimals"], meta["tol"]) == ("eV", 2, pytest.approx(0.6))  # 2 x the suite's 0.3 eV
    ref = Reference(4.5, "test")
    exact = check(q, "The gap is 4.50 eV", ref)
    assert (exact.value, exact.error, exact.score) == (4.5, 0.0, 1.0)
    half = check(q, "The gap is 4.80 eV", ref)  # error 0.3 of tol 0.6
    assert half.error == pytest.approx(0.3) and half.score == pytest.approx(0.5, abs=1e-9)
    far = check(q, "9 eV", ref)
    assert far.error == pytest.approx(4.5) and far.score == 0.0
    garbage = check(q, "I am not sure, maybe ask a chemist", ref)
    assert (garbage.value, garbage.error, garbage.score) == (None, None, 0.0)
    assert "unparsable" in questions.describe(garbage) and "score 0" in questions.describe(garbage)


def test_the_molecule_is_a_held_out_chembl_drug_asked_in_the_seen_wording():
    q = molecule_question()
    rec = q.record
    smiles = rec["item"]
    assert science_tasks.split_of("quantum", smiles) == "test"  # unseen by every expert (one key space)
    assert (rec["domain"], rec["kind"], rec["split"], rec["meta"]["property"]) == ("quantum", "qm_forward", "test", "gap")
    assert smiles in rec["prompt"] and rec["meta"]["value"] == pytest.approx(q.recorded, abs=0.005)
    families, held_out, _ = wording.families("qm_forward")
    assert rec["family"].split("/")[1] in families and rec["family"].split("/")[1] not in held_out
    assert not any(p in rec["prompt"].lower() for p in wording.held_out_phrases("qm_forward", ("gap",), ("eV",)))
    assert q.name == "NORETHYNODREL" and molecule_question() == q  # a fixed choice


def test_the_peptide_is_held_out_and_checked_against_its_recorded_pulls():
    q = peptide_question()
    seq = q.record["item"]
    assert science_tasks.split_of("mechanics", seq) == "test" and seq in q.record["prompt"]
    assert (q.record["kind"], q.record["meta"]["property"], q.unit) == ("mech_forward", "force", "pN")
    row = next(r for r in science_tasks.load_pools().mechanics if r["sequence"] == seq)
    ref = reference(q)
    assert ref.value == row["force"] and ref.seconds is None and "recorded OpenMM pull" in ref.how


def test_xtb_reference_is_computed_now_and_equals_the_recorded_gap():
    pytest.importorskip("tblite", reason="the science extra (tblite) is not installed")
    q = molecule_question()
    ref = reference(q)
    assert ref.seconds is not None and ref.seconds > 0 and "computed now" in ref.how
    assert ref.value == pytest.approx(q.recorded, abs=1e-6)  # test_sciencedata's reproduction tolerance


def test_without_tblite_the_recorded_gap_is_used_and_said(monkeypatch):
    q = molecule_question()
    monkeypatch.setattr(questions, "has_tblite", lambda: False)
    ref = reference(q)
    assert ref.value == q.recorded and ref.seconds is None and "tblite is not installed" in ref.how
    assert reference(q, live=False).how == q.provenance


ANSWERS = ["The gap: 3.07 eV", "no idea"]  # the first fits the default answer budget (16 tokens)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, one_thread):
    """A tiny GPT-2 scripted to answer the molecule question with a sentence and the peptide one with no number,
    under two random experts and X-LoRA's random router."""
    tok = tiny_tokenizer()
    asked = [molecule_question(), peptide_question()]
    prompts = [tok(tok.apply_chat_template(chat_messages(q.record, answer=False), tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in asked]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in ANSWERS]
    base = scripted_model(script_answers(prompts, answers), len(tok), max(map(len, prompts)) + 24)
    root = tmp_path_factory.mktemp("questions")
    experts = {n: str(make_expert(base, root / n, r=4, alpha=8, targets=GPT2_TARGETS, seed=i + 1))
               for i, n in enumerate(["quantum", "mechanics"])}
    model = XLoraModel(base, XLoraConfig(experts=experts, head_depth=1, global_scaling_weight=0.2)).eval()
    return model, tok, asked


def test_ask_returns_the_parsed_number_of_the_models_answer(scripted):
    model, tok, asked = scripted
    checked, ids, scalings = questions.ask(model, tok, asked, live=False, max_new_tokens=24)
    assert [c.answer for c in checked] == ANSWERS
    gap, force = checked
    assert gap.value == 3.07 and gap.reference.value == asked[0].recorded
    assert gap.error == pytest.approx(abs(3.07 - asked[0].recorded), abs=1e-9)
    assert gap.score == pytest.approx(max(0.0, 1 - gap.error / 0.6), abs=0.02)  # reference rounded to 2 decimals
    assert (force.value, force.error, force.score) == (None, None, 0.0)
    for new, s, text in zip(ids, scalings, ANSWERS):
        assert len(new) == len(text) and s.shape == (len(new), model.num_layers, 2)  # char tokens, eos cut
        assert torch.allclose(s.sum(-1), torch.ones(()), atol=1e-5)


def test_show_questions_prints_the_checks_and_writes_heatmaps(scripted, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from xlora.demo.run import show_questions

    model, tok, asked = scripted
    paths = show_questions(model, tok, tmp_path, live=False)
    out = capsys.readouterr().out
    assert asked[0].name in out and asked[0].record["prompt"] in out and "score 0" in out
    assert f"3.07 eV, |error| {abs(3.07 - asked[0].recorded):.3g} eV" in out
    assert "recorded OpenMM pull" in out
    assert {p.name.split("-tokens")[0].split("-layers")[0] for p in paths} == {"question-quantum", "question-mechanics"}
    assert all(p.is_file() for p in paths)
