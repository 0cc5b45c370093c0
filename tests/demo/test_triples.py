"""The triple line parser on malformed, partial and adversarial model outputs; scoring; the ontology's passages."""

from __future__ import annotations

import random

import pytest

from xlora.demo import domains, ontology
from xlora.demo.triples import MAX_FIELD, format_triples, is_filler, normalise, parse_line, parse_triples, prf


def test_well_formed_lines_and_what_a_small_model_wraps_around_them():
    text = ("silk fibroin | has secondary structure | beta sheet\n"
            "1. Collagen | is made of | Tropoelastin.\n"
            "- nacre |has property|  toughness \n"
            "* (keratin | is stabilized by | disulfide bridging)\n"
            "2) `graphene` | is used for | \"body armor\"\n")
    r = parse_triples(text)
    assert r.triples == [("silk fibroin", "has secondary structure", "beta sheet"),
                         ("Collagen", "is made of", "Tropoelastin"), ("nacre", "has property", "toughness"),
                         ("keratin", "is stabilized by", "disulfide bridging"),
                         ("graphene", "is used for", "body armor")]
    assert r.n_malformed == 0 and r.duplicates == 0


def test_malformed_lines_are_counted_and_skipped():
    text = ("Here are the triples:\n"                         # prose
            "silk | is made of\n"                             # two fields
            "a | b | c | d\n"                                 # four fields
            " | is made of | collagen\n"                      # empty subject
            "123 | 456 | 789\n"                               # no letters
            "bone | is made of | collagen\n"
            "\n   \n---\n"                                    # blank lines and a rule are not counted
            "tendon | is made of | " + "x" * (MAX_FIELD + 1) + "\n"  # an absurdly long field
            "wood | is used for | textile fi")                # truncated last line: still a triple
    r = parse_triples(text)
    assert r.triples == [("bone", "is made of", "collagen"), ("wood", "is used for", "textile fi")]
    assert r.n_malformed == 6
    assert r.malformed[0] == "Here are the triples:" and r.malformed[1] == "silk | is made of"


@pytest.mark.parametrize("junk", [None, "", "\x00\x01\x02", "|||||", "| | |", "\ufffd" * 50, "a|b|c" * 1000,
                                  "\n" * 1000, "🙂 | 🙂 | 🙂", "<|im_end|>", "x | y |\nz"])
def test_adversarial_outputs_never_crash(junk):
    r = parse_triples(junk)
    assert isinstance(r.triples, list) and r.n_malformed >= 0
    for t in r.triples:
        assert len(t) == 3 and all(0 < len(f) <= MAX_FIELD for f in t)


def test_control_characters_and_unicode_are_normalised_and_duplicates_merged():
    text = ("Silk\u200b Fibroin | has secondary structure | Beta  Sheet\n"
            "silk fibroin | HAS SECONDARY STRUCTURE | beta sheet.\n"
            "ｓｉｌｋ fibroin | has secondary structure | beta sheet\n")  # full-width letters (NFKC)
    r = parse_triples(text)
    assert r.triples == [("Silk Fibroin", "has secondary structure", "Beta Sheet")] and r.duplicates == 2
    assert normalise("  The\tBeta   SHEET. ") == "the beta sheet"
    assert parse_line("a\x00b | c | d") == ("ab", "c", "d")


def test_prf():
    gold = [("a", "r", "b"), ("c", "r", "d")]
    assert prf(gold, gold) == (1.0, 1.0, 1.0)
    assert prf([("A ", "R", "b."), ("x", "r", "y")], gold) == (0.5, 0.5, 0.5)
    assert prf([], gold) == (0.0, 0.0, 0.0) and prf([], []) == (1.0, 1.0, 1.0)
    assert prf([("x", "r", "y")], gold) == (0.0, 0.0, 0.0)


def test_round_trip_and_the_graph_checker():
    rec = domains.generate("graph", "test", 1)[0]
    gold = [tuple(t) for t in rec["meta"]["value"]]
    assert parse_triples(format_triples(gold)).triples == gold
    assert domains.check(rec, rec["completion"]) == 1.0
    assert domains.check(rec, "nothing useful") == 0.0
    half = format_triples(gold[:1] + [("made", "up", "triple")])
    _, _, f1 = prf(gold[:1] + [("made", "up", "triple")], gold)
    assert domains.check(rec, half) == pytest.approx(f1) and 0 < f1 < 1


def test_held_out_passages_share_no_entity_and_no_sentence_shape_with_training():
    train = domains.generate("graph", "train", 200) + domains.generate("graph", "validation", 40)
    test = domains.generate("graph", "test", 60) + domains.generate("graph", "test_unseen", 60)
    ents = lambda recs: {x for r in recs for t in r["meta"]["value"] for x in (t[0], t[2])}  # noqa: E731
    assert ents(train) and ents(test) and not ents(train) & ents(test)
    assert all(ontology._held_out(e) for e in ents(test)) and not any(ontology._held_out(e) for e in ents(train))
    shape_starts = [s.split("{")[0] for s, _ in ontology.SHAPES_HELD_OUT if s.split("{")[0]]
    for r in train:
        assert not any(start in r["prompt"] for start in shape_starts)
    assert any(start in r["prompt"] for r in test for start in shape_starts)
    # every relation is well typed and stated in the passage through one of its surface forms
    for r in train[:50] + test[:50]:
        for s, rel, o in r["meta"]["value"]:
            kinds, obj_kind, forms = ontology.RELATIONS[rel]
            assert ontology._kind_of(s) in kinds and ontology._kind_of(o) == obj_kind
            assert o in r["prompt"] and any(f"{v} {o}{w}" in r["prompt"] for v, w in forms)


def test_passages_are_deterministic_and_of_bounded_size():
    a = [ontology.passage(random.Random(i), False) for i in range(30)]
    assert a == [ontology.passage(random.Random(i), False) for i in range(30)]
    for text, triples in a:
        assert 2 <= len(triples) <= 8 and len(set(triples)) == len(triples) and text.count(".") >= 2


def test_graph_eval_micro_scores_and_table():
    from xlora.demo.graph_eval import score_answers, to_markdown

    gold = [[("a", "r", "b"), ("c", "r", "d")], [("e", "r", "f")]]
    answers = ["a | r | b\nx | r | y\njunk", "E | R | F."]
    s = score_answers(answers, gold)
    assert (s["predicted"], s["gold"], s["malformed_lines"]) == (3, 3, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert score_answers(["", ""], gold)["f1"] == 0.0
    md = to_markdown({"split": "test", "n": 2, "scores": {"base": score_answers(["", ""], gold), "xlora": s},
                      "routing": {"mean_scalings": {"graph": 0.7, "general": 0.3}, "top1_graph": 1.0}})
    assert "| xlora | 0.667 | 0.667 | **0.667** | 3 / 3 gold | 1 |" in md and "graph expert top-1 on 1.000" in md


def test_rules_and_blank_lines_are_filler_for_every_reader():
    """parse_triples and graph.extract skip the same lines (both ask is_filler)."""
    assert all(is_filler(x) for x in ("", "   ", "---", "***", "```", "## "))
    assert not any(is_filler(x) for x in ("silk | is | strong", "not a triple", "-- x"))
    result = parse_triples("---\nsilk | is | strong\n\n```\nnot a triple")
    assert result.triples == [("silk", "is", "strong")] and result.malformed == ["not a triple"]
