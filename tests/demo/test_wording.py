"""The wording composer: hundreds of surface forms per task kind, held-out frame families and alias sets that
no seen prompt uses, content never restyled, and everything a pure function of the seed."""

from __future__ import annotations

import random
import re

import pytest

from xlora.demo import _wording_data as vocab
from xlora.demo import wording

# one item's slots per kind (content only; the composer never looks at values beyond the named slots)
SLOTS = {
    "protein_forward": [{"x": "MKTAYIAKQR", "prop": p, "unit": u, "decimals": 2}
                        for p, u in (("mw", "Da"), ("pi", ""), ("gravy", ""), ("instability", ""))],
    "chem_value": [{"x": "CCO", "prop": p, "unit": u, "decimals": 2} for p, u in (("mw", "g/mol"), ("logp", ""))],
    "qm_forward": [{"x": "c1ccccc1", "prop": p, "unit": u, "decimals": 2}
                   for p, u in (("gap", "eV"), ("homo", "eV"), ("lumo", "eV"), ("dipole", "D"))],
    "measured": [{"x": "CCO", "prop": p, "unit": u, "decimals": 2}
                 for p, u in (("hydration", "kcal/mol"), ("logs", "log(mol/L)"))],
    "mech_forward": [{"x": "AEAAAKEAAAKA", "prop": p, "unit": u, "decimals": 0} for p, u in (("force", "pN"), ("work", "kJ/mol"))],
    "chem_count": [{"x": "c1ccccc1O", "prop": p} for p in ("rings", "hbd", "hba")],
    "protein_inverse": [{"n": 12, "prop": p, "unit": u, "lo": "1", "hi": "2"} for p, u in (("mw", "Da"), ("pi", ""))],
    "chem_inverse": [{"prop": "logp", "unit": "", "lo": "1", "hi": "2"}, {"prop": "rings", "exact": True, "lo": "2"}],
    "qm_inverse": [{"prop": "gap", "unit": "eV", "lo": "3.5", "hi": "4.5"}],
    "mech_inverse": [{"n": 14, "prop": "force", "unit": "pN", "lo": "300", "hi": "380"}],
    "linear": [{"a": 3, "pm": "+", "babs": 4, "c": 10}],
    "arith": [{"e": "12 + 30"}], "mod": [{"a": 50, "b": 7}], "frac": [{"f": "6/8"}],
    "capital": [{"c": "Peru"}], "antonym": [{"w": "hot"}], "upper": [{"w": "zebra"}], "sort": [{"ws": "b, a"}],
    "count": [{"t": "one two"}], "next": [{"u": "day", "x": "Monday"}], "date": [{"d": "2001-02-03"}],
    "words": [{"n": 17}], "graph": [{"p": "Silk is strong."}],
}


def _draw(kind: str, split: str, n: int, seed: int = 0, wide: bool = False) -> list[wording.Wording]:
    rng = random.Random(f"{kind}:{split}:{seed}")
    return [wording.compose(kind, split, rng, rng.choice(SLOTS[kind]), wide=wide) for _ in range(n)]


def test_every_kind_has_slots_here():
    assert set(SLOTS) == set(wording.KINDS)


@pytest.mark.parametrize("kind", sorted(wording.KINDS))
def test_hundreds_of_surface_forms_per_kind(kind):
    seen = {w.template for w in _draw(kind, "train", 600)}
    unseen = {w.template for w in _draw(kind, "test_unseen", 200)}
    assert len(seen) >= 100, (kind, len(seen))
    assert len(unseen) >= 20, (kind, len(unseen))
    assert not seen & unseen


@pytest.mark.parametrize("kind", sorted(wording.KINDS))
def test_test_unseen_uses_only_held_out_families_and_alias_sets(kind):
    fams, held, prefix = wording.families(kind)
    assert held and set(held) < set(fams)  # some families are held out, some are seen
    seen = _draw(kind, "train", 400) + _draw(kind, "validation", 100) + _draw(kind, "test", 100) \
        + _draw(kind, "train", 400, wide=True)  # the head's wider pools are seen too
    unseen = _draw(kind, "test_unseen", 200)
    assert {w.family for w in unseen} == {f"{prefix}/{f}" for f in held}
    assert not {w.family for w in seen} & {f"{prefix}/{f}" for f in held}
    assert {w.which for w in seen} == {"seen"} and {w.which for w in unseen} == {"unseen"}
    props = tuple(sorted({s["prop"] for s in SLOTS[kind] if "prop" in s}))
    units = tuple(sorted({s["unit"] for s in SLOTS[kind] if s.get("unit")}))
    for w in unseen:  # every part comes from a held-out pool
        if "prop" in w.parts:
            assert any(w.parts["prop"] in vocab.PROPERTY_ALIASES[p][1] for p in props), w.parts
        assert w.parts["context"] in vocab.CONTEXTS[1]
    # on the text: no held-out alias, verb, noun, unit spelling or context occurs in a seen prompt's wording
    held_words = wording.held_out_phrases(kind, props, units)
    assert held_words
    for w in seen:
        text = w.template.lower()
        assert not [h for h in held_words if re.search(r"(?<![\w-])" + re.escape(h) + r"(?![\w-])", text)], w.template
    # ... while the held-out words do occur in test_unseen (the test is not vacuous)
    used = {h for w in unseen for h in held_words if h in w.template.lower()}
    assert len(used) >= min(3, len(held_words))


def test_aliases_the_issue_names_are_split_into_seen_and_held_out_sets():
    mw_seen, mw_unseen = vocab.PROPERTY_ALIASES["mw"]
    assert "molecular weight" in mw_seen and "MW" in mw_seen and "molar mass" in mw_unseen
    assert "isoelectric point" in vocab.PROPERTY_ALIASES["pi"][0]
    assert "pH of zero net charge" in vocab.PROPERTY_ALIASES["pi"][1]
    gap_seen, gap_unseen = vocab.PROPERTY_ALIASES["gap"]
    assert "HOMO-LUMO gap" in gap_seen and {"frontier orbital gap", "band gap"} == set(gap_unseen)
    for prop, (seen, unseen) in vocab.PROPERTY_ALIASES.items():
        assert seen and unseen and not set(seen) & set(unseen), prop
    assert set(vocab.VARIABLES[0]) == {"x", "y", "n", "t"} and not set(vocab.VARIABLES[0]) & set(vocab.VARIABLES[1])


def test_casing_never_touches_the_content():
    rng = random.Random(1)
    casings = set()
    for _ in range(200):
        w = wording.compose("qm_forward", "test_unseen", rng, {"x": "c1ccc(Cl)cc1", "prop": "gap", "unit": "eV",
                                                               "decimals": 2})
        casings.add(w.parts["casing"])
        assert "c1ccc(Cl)cc1" in w.prompt and w.prompt == w.template.format(x="c1ccc(Cl)cc1", decimals=2)
        if w.parts["casing"] == "upper":
            assert w.prompt.replace("c1ccc(Cl)cc1", "").isupper()
    assert casings == {"as written", "lower", "upper"}


def test_casings_override_only_the_casing_of_a_seen_split():
    """The head's data draws every casing on the seen side: ALL CAPS, with every other part still seen."""
    slots = {"x": "c1ccc(Cl)cc1", "prop": "gap", "unit": "eV", "decimals": 2}
    plain = wording.compose("qm_forward", "train", random.Random(3), slots)
    upper = wording.compose("qm_forward", "train", random.Random(3), slots, casings=("upper",))
    assert plain.parts["casing"] != "upper" and upper.parts["casing"] == "upper" and upper.which == "seen"
    assert {k: v for k, v in upper.parts.items() if k != "casing"} == \
        {k: v for k, v in plain.parts.items() if k != "casing"}  # one draw each: the same other parts
    assert upper.prompt.replace("c1ccc(Cl)cc1", "").isupper() and upper.prompt.upper() == plain.prompt.upper()
    rng = random.Random(4)
    drawn = {wording.compose("arith", "train", rng, {"e": "2 + 3"}, wording.CASINGS).parts["casing"]
             for _ in range(60)}
    assert drawn == set(wording.CASINGS)
    for bad in ((), ("shouting",), "upper"):
        with pytest.raises(ValueError, match="casings="):
            wording.compose("qm_forward", "train", random.Random(0), slots, casings=bad)


@pytest.mark.parametrize("kind", ["protein_forward", "qm_forward", "chem_count", "mech_inverse", "linear"])
def test_wide_adds_seen_entries_only_to_seen_splits(kind):
    """``wide`` (the head's data) draws new aliases, verbs, contexts, closings and frame families on a seen split,
    none of them in the plain seen pools, and leaves test_unseen exactly as it was."""
    plain, wide = _draw(kind, "train", 300), _draw(kind, "train", 300, wide=True)
    assert _draw(kind, "test_unseen", 50, wide=True) == _draw(kind, "test_unseen", 50)
    assert {w.which for w in wide} == {"seen"}
    spec = wording.KINDS[kind]
    new_families = {f"{spec.frames}/{f}" for f in vocab.WIDE_FRAMES[spec.frames]}
    assert {w.family for w in wide} & new_families and not {w.family for w in plain} & new_families
    new_contexts = {w.parts["context"] for w in wide} - {w.parts["context"] for w in plain}
    assert new_contexts and new_contexts <= set(vocab.WIDE_CONTEXTS)
    if spec.noun:  # a property kind: aliases from the wide set, which the plain pools never draw
        props = {s["prop"] for s in SLOTS[kind]}
        wide_aliases = {a for p in props for a in vocab.WIDE_ALIASES[p]}
        assert {w.parts["prop"] for w in wide} & wide_aliases and not {w.parts["prop"] for w in plain} & wide_aliases
    for p, extra in vocab.WIDE_ALIASES.items():  # every wide alias is new, and no held-out alias
        assert not set(extra) & (set(vocab.PROPERTY_ALIASES[p][0]) | set(vocab.PROPERTY_ALIASES[p][1])), p


def test_a_linear_equation_names_its_variable():
    for w in _draw("linear", "train", 50) + _draw("linear", "test_unseen", 50):
        v = w.parts["v"]
        assert re.search(rf"3\*?{v} \+ 4 = 10|10 = 3{v} \+ 4", w.prompt), w.prompt


def test_a_peptide_design_prompt_always_states_the_length():
    for kind, n in (("protein_inverse", "12"), ("mech_inverse", "14")):
        for w in _draw(kind, "train", 100) + _draw(kind, "test_unseen", 50):
            assert re.search(rf"\b{n}\b", w.prompt), w.prompt


def test_composition_is_a_pure_function_of_the_seed():
    a, b, c = _draw("protein_forward", "train", 30, 0), _draw("protein_forward", "train", 30, 0), \
        _draw("protein_forward", "train", 30, 1)
    assert a == b and [w.prompt for w in a] != [w.prompt for w in c]
    w = wording.compose("capital", "train", random.Random(5), {"c": "Peru"})
    assert w == wording.compose("capital", "train", random.Random(5), {"c": "Peru"})


def test_one_composed_prompt_exactly():
    w = wording.compose("qm_forward", "train", random.Random(2), {"x": "CCO", "prop": "gap", "unit": "eV", "decimals": 2})
    assert (w.prompt, w.frame) == ("For a lab report: Report the HOMO-LUMO energy gap of the compound CCO "
                                   "[electronvolts]. Give 2 decimals. Thanks.", "qm_forward/imperative/0")
    assert w.template == ("For a lab report: Report the HOMO-LUMO energy gap of the compound {x} [electronvolts]. "
                          "Give {decimals} decimals. Thanks.")
    assert w.parts == {"verb": "report", "prop": "HOMO-LUMO energy gap", "thing": "the compound",
                       "unit_clause": " [{unit_word}]", "unit_word": "electronvolts", "dec": "Give {decimals} decimals.",
                       "context": "For a lab report:", "closing": "Thanks.", "casing": "as written", "ending": "keep"}


def test_bad_input_is_named():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="task kind 'poem'"):
        wording.compose("poem", "train", rng, {})
    with pytest.raises(ValueError, match="slot 'prop'='spin'"):
        wording.compose("qm_forward", "train", rng, {"x": "C", "prop": "spin", "unit": "", "decimals": 2})
    with pytest.raises(ValueError, match="needs slot 'x'"):
        wording.compose("qm_forward", "train", rng, {"prop": "gap", "unit": "eV", "decimals": 2})
