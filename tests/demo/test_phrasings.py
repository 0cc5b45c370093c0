"""Phrasings: at least six seen templates per task kind, unseen templates only in ``test_unseen``, and the
``test_unseen`` drawing from the ``test`` items only (items never trained on; its own draw of them, not
the very records of ``test``)."""

from __future__ import annotations

import random
import re
import string

import pytest

from xlora.demo import domains, phrasings

# graph, mathematics and general need neither RDKit nor Biopython; the others are skipped without them
_NEEDS = {"protein": "Bio", "chemistry": "rdkit"}


@pytest.fixture(params=domains.DOMAINS)
def domain(request):
    if request.param in _NEEDS:
        pytest.importorskip(_NEEDS[request.param])
    return request.param


CONTENT = {"protein_forward": {"seq"}, "protein_inverse": {"n", "lo", "hi"}, "chem_value": {"s"}, "chem_count": {"s"},
           "chem_inverse": {"what"}, "arith": {"e"}, "mod": {"a", "b"}, "frac": {"f"}, "linear": {"eq"},
           "capital": {"c"}, "antonym": {"w"}, "upper": {"w"}, "sort": {"ws"}, "count": {"t"}, "next": {"x"},
           "date": {"d"}, "words": {"n"}, "graph": {"p"}}


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_every_kind_has_six_seen_and_two_unseen_templates_with_the_same_slots():
    for kind, (seen, unseen) in phrasings.TEMPLATES.items():
        assert len(seen) >= 6 and len(unseen) >= 2, kind
        assert len(set(seen) | set(unseen)) == len(seen) + len(unseen), f"{kind}: a template is both seen and unseen"
        for t in seen + unseen:  # every wording carries the content the head should route on
            assert CONTENT[kind] <= _slots(t), (kind, t)
    # the templates vary the register: questions and imperatives in the seen set of every numeric kind
    for kind in ("protein_forward", "chem_value", "arith", "mod", "linear"):
        seen = phrasings.templates(kind)
        assert any(t.rstrip().endswith("?") for t in seen) and any(not t.rstrip().endswith("?") for t in seen), kind


def _skeleton(template: str) -> re.Pattern:
    """A regex matching exactly the prompts a template can produce (slots filled with anything)."""
    parts = [re.escape(lit) + ("(.+?)" if name else "") for lit, name, _, _ in string.Formatter().parse(template)]
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)


def test_unseen_phrasings_never_occur_in_training_or_validation(domain):
    used = {s: domains.generate(domain, s, 120 if s == "train" else 40) for s in ("train", "validation", "test")}
    unseen = domains.generate(domain, "test_unseen", 40)
    assert {r["template"].split("/")[1][0] for r in unseen} == {"u"}
    for split, records in used.items():
        assert {r["template"].split("/")[1][0] for r in records} == {"s"}, split
    # on the templates: no prompt of train/validation/test matches an unseen template's shape ...
    kinds = {r["template"].split("/")[0] for rs in used.values() for r in rs}
    unseen_shapes = [_skeleton(t) for k in kinds for t in phrasings.templates(k, phrasings.UNSEEN)]
    for records in used.values():
        for r in records:
            assert not any(p.match(r["prompt"]) for p in unseen_shapes), r["prompt"]
            assert _skeleton(phrasings.template_of(r["template"])).match(r["prompt"])
    # ... and on the prompts: none of test_unseen's prompts occurs anywhere else
    others = {r["prompt"] for rs in used.values() for r in rs}
    assert not others & {r["prompt"] for r in unseen}
    for r in unseen:
        assert _skeleton(phrasings.template_of(r["template"])).match(r["prompt"])


def test_training_data_of_the_head_and_experts_uses_only_seen_phrasings():
    from xlora.demo.retrain import EXPERT_BATCH, HEAD_BATCH, HEAD_STEPS, SEED

    mix = domains.generate_mixture("train", HEAD_STEPS * HEAD_BATCH // len(domains.DOMAINS) + 1, seed=SEED + 1,
                                   domains=["mathematics", "general", "graph"])
    expert = domains.generate("graph", "train", 20 * EXPERT_BATCH, seed=SEED)
    unseen = {t for k in phrasings.TEMPLATES for t in phrasings.templates(k, phrasings.UNSEEN)}
    for r in mix + expert:
        assert phrasings.template_of(r["template"]) not in unseen
    kinds_used = {r["template"] for r in mix}
    assert len({t for t in kinds_used if t.startswith("arith/")}) >= 6  # the head sees the variety


def test_test_unseen_asks_held_out_items_in_new_words(domain):
    train = domains.generate(domain, "train", 150)
    test, unseen = domains.generate(domain, "test", 30), domains.generate(domain, "test_unseen", 30)
    assert {r["task"] for r in test} == {r["task"] for r in unseen} == {n for n, _, _ in domains.TASKS[domain]}
    assert all(domains.check(r, r["completion"]) == 1.0 for r in unseen)
    # the item (molecule, sequence, passage, or the item in its original wording) is a test item, never a
    # training item, whatever words ask for it
    assert not {r["item"] for r in train} & {r["item"] for r in unseen}
    if domain != "graph":
        assert {domains.split_of(domain, r["item"]) for r in unseen} == {"test"}
        assert {domains.split_of(domain, r["item"]) for r in train} == {"train"}


def test_the_item_key_is_the_original_wording():
    rng = random.Random(0)
    for _ in range(100):
        item = domains.math_task(rng, False)
        if item.kind != "arith":
            assert item.key == phrasings.templates(item.kind)[0].format(**item.slots)
        item = domains.general_task(rng, False)
        assert item.key == phrasings.templates(item.kind)[0].format(**item.slots)


def test_phrase_and_template_of_round_trip():
    rng = random.Random(3)
    prompt, tid = phrasings.phrase("capital", "test_unseen", rng, c="Peru")
    assert tid.startswith("capital/u") and phrasings.template_of(tid).format(c="Peru") == prompt
    prompt, tid = phrasings.phrase("capital", "train", rng, c="Peru")
    assert tid.startswith("capital/s") and "Peru" in prompt
    with pytest.raises(ValueError, match="task kind 'poem'"):
        phrasings.templates("poem")
    with pytest.raises(ValueError, match="which must be"):
        phrasings.templates("capital", "hidden")
