"""Prompt phrasings of every demo task kind: seen templates for training, validation and ``test``, and
held-out templates that only ``test_unseen`` uses.

Each task kind has at least six *seen* templates (the first one is the original wording the shipped
experts were trained on) varying word order, register ("compute" / "estimate" / "what is"), question
versus imperative and with or without units, and two *unseen* templates that no training or
validation record of the experts or the head ever uses. A template is a :meth:`str.format` string
over the kind's named slots; :func:`phrase` picks one with the caller's seeded RNG.

The point (issue 15): routing should follow the *content* of a prompt (a protein sequence, a SMILES
string, an arithmetic expression) and not the words around it, so ``test_unseen`` changes the words.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

SEEN, UNSEEN = "seen", "unseen"
SPLITS = ("train", "validation", "test", "test_unseen")  # the demo's and the suite's record splits

# kind -> (seen templates, unseen templates); slot names are listed per kind in SLOTS
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "protein_forward": ((
        "What is the {long} of the protein sequence {seq}? Give {decimals} decimals.",
        "Compute the {short} of {seq} ({decimals} decimals).",
        "Protein: {seq}. Estimate its {short}, rounded to {decimals} decimals.",
        "For the peptide {seq}, what is its {long}?",
        "Please calculate the {long} for this amino-acid sequence: {seq}",
        "{seq} -- {short}? Round to {decimals} decimal places.",
        "I need the {short} of the protein {seq}. Report it with {decimals} decimals.",
    ), (
        "Given the amino-acid chain {seq}, determine its {short} to {decimals} decimal places.",
        "hey, could you tell me what the {long} of {seq} comes out to?",
    )),
    "protein_inverse": ((
        "Write a protein sequence of exactly {n} residues with {long} between {lo} and {hi}.",
        "Design a {n}-residue peptide whose {short} lies between {lo} and {hi}.",
        "Give an amino-acid sequence of length {n} with a {short} in the range [{lo}, {hi}].",
        "I need a protein of {n} amino acids; its {long} should be from {lo} to {hi}.",
        "Propose a sequence ({n} residues) having {short} between {lo} and {hi}.",
        "Can you invent a {n}-amino-acid protein with {short} within {lo} to {hi}?",
    ), (
        "Generate any peptide chain, {n} residues long, whose {short} falls between {lo} and {hi}.",
        "What protein sequence of length {n} would have a {long} of {lo} up to {hi}?",
    )),
    "chem_value": ((
        "What is the {long} of the molecule {s}? Give 2 decimals.",
        "Compute the {short} of {s} (2 decimals).",
        "SMILES: {s}. Estimate its {short}, rounded to 2 decimals.",
        "For the compound {s}, what is its {long}?",
        "Please calculate the {long} of this molecule: {s}",
        "{s} -- {short}? Round to 2 decimal places.",
    ), (
        "Given the structure {s}, determine the {short} to two decimal places.",
        "hey, what does the {long} of {s} come out to?",
    )),
    "chem_count": ((
        "How many {noun} does the molecule {s} have?",
        "Count the {noun} in {s}.",
        "SMILES: {s}. Number of {noun}?",
        "What is the number of {noun} in the compound {s}?",
        "Tell me how many {noun} the structure {s} contains.",
        "{s}: how many {noun}?",
    ), (
        "Determine the count of {noun} present in the molecule with SMILES {s}.",
        "In {s}, how many {noun} are there in total?",
    )),
    "chem_inverse": ((
        "Propose a valid molecule, as SMILES, with {what}.",
        "Design a molecule with {what}. Answer in SMILES.",
        "Give the SMILES of any compound with {what}.",
        "I need a molecule having {what}; write its SMILES.",
        "Suggest a structure (SMILES) with {what}.",
        "Can you come up with a compound with {what}? SMILES only.",
    ), (
        "Write down a SMILES string for some molecule that has {what}.",
        "Which molecule, given as SMILES, would have {what}?",
    )),
    "arith": ((
        "What is {e}?",
        "Compute {e}.",
        "Evaluate {e}.",
        "{e} = ?",
        "Calculate the value of {e}.",
        "Find {e}.",
        "What do you get for {e}?",
    ), (
        "Work out {e} for me, please.",
        "Tell me the result of {e}.",
    )),
    "mod": ((
        "What is the remainder of {a} divided by {b}?",
        "Compute {a} mod {b}.",
        "Find the remainder when {a} is divided by {b}.",
        "{a} modulo {b} = ?",
        "What is {a} mod {b}?",
        "Divide {a} by {b}; what remains?",
    ), (
        "Tell me what is left over after dividing {a} by {b}.",
        "Calculate {a} % {b}.",
    )),
    "frac": ((
        "Simplify the fraction {f}.",
        "Reduce {f} to lowest terms.",
        "What is {f} in simplest form?",
        "Write {f} as a reduced fraction.",
        "Simplify {f}.",
        "{f} simplified = ?",
    ), (
        "Cancel the common factors in {f} and give the result.",
        "Put the fraction {f} in its lowest terms, please.",
    )),
    "linear": ((
        "Solve for x: {eq}.",
        "Find x if {eq}.",
        "What is x in {eq}?",
        "Solve the equation {eq}.",
        "{eq}. x = ?",
        "Determine x such that {eq}.",
    ), (
        "Which value of x satisfies {eq}?",
        "Work out x given that {eq}.",
    )),
    "capital": ((
        "What is the capital of {c}? Answer with the city name only.",
        "Name the capital city of {c}.",
        "Capital of {c}?",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "{c}'s capital is which city?",
    ), (
        "In which city does the government of {c} sit?",
        "Quick geography question: the capital of {c}?",
    )),
    "antonym": ((
        "Give the opposite of the word '{w}'. One word.",
        "What is the antonym of '{w}'?",
        "Opposite of {w}?",
        "Name a word that means the opposite of '{w}'.",
        "Write the antonym of {w}.",
        "'{w}' - what is its opposite?",
    ), (
        "Which word has the reverse meaning of '{w}'?",
        "Tell me the contrary of the word {w}.",
    )),
    "upper": ((
        "Write the word '{w}' in capital letters.",
        "Convert '{w}' to uppercase.",
        "Uppercase: {w}",
        "Rewrite {w} in all caps.",
        "What is '{w}' in upper case?",
        "Please capitalize every letter of '{w}'.",
    ), (
        "Spell {w} using only capital letters.",
        "Turn the word '{w}' into uppercase letters.",
    )),
    "sort": ((
        "Sort these words alphabetically: {ws}.",
        "Put in alphabetical order: {ws}.",
        "Alphabetize the list {ws}.",
        "Arrange {ws} from A to Z.",
        "Order these words alphabetically: {ws}",
        "Can you sort {ws} in alphabetical order?",
    ), (
        "List the following in dictionary order: {ws}.",
        "Rearrange alphabetically, please: {ws}.",
    )),
    "count": ((
        "How many words are in this text: \"{t}\"?",
        "Count the words in \"{t}\".",
        "Number of words in: {t}",
        "How many words does \"{t}\" contain?",
        "Tell me the word count of \"{t}\".",
        "\"{t}\" - how many words?",
    ), (
        "Give the total number of words in the phrase \"{t}\".",
        "What is the length in words of \"{t}\"?",
    )),
    "next": ((
        "Which {u} comes after {x}?",
        "What {u} follows {x}?",
        "Name the {u} after {x}.",
        "After {x} comes which {u}?",
        "The {u} following {x} is?",
        "Tell me the next {u} after {x}.",
    ), (
        "If it is {x} now, which {u} is next?",
        "What is the {u} right after {x}?",
    )),
    "date": ((
        "Rewrite the date {d} in DD/MM/YYYY format.",
        "Convert {d} to DD/MM/YYYY.",
        "Format the date {d} as DD/MM/YYYY.",
        "{d} in DD/MM/YYYY?",
        "Write {d} as day/month/year (DD/MM/YYYY).",
        "Express the date {d} in the DD/MM/YYYY style.",
    ), (
        "Change the ISO date {d} into DD/MM/YYYY notation.",
        "How is {d} written in DD/MM/YYYY form?",
    )),
    "words": ((
        "Write the number {n} in English words.",
        "Spell out {n} in words.",
        "How is {n} written in words?",
        "Express {n} in English words.",
        "{n} in words?",
        "Give the English words for the number {n}.",
    ), (
        "Write out the numeral {n} as English text.",
        "What are the words for {n}?",
    )),
    "graph": ((
        "Extract the knowledge-graph triples from this passage, one per line as subject | relation | object.\n\n{p}",
        "List the (subject | relation | object) triples stated in the text below.\n\n{p}",
        "Text: {p}\n\nWrite its triples, one per line: subject | relation | object.",
        "Build a knowledge graph from the following passage; output triples as subject | relation | object.\n\n{p}",
        "Which facts does this passage state? Answer with triples (subject | relation | object), one per line.\n\n{p}",
        "Read the passage and give every triple as subject | relation | object.\n\nPassage: {p}",
    ), (
        "Turn the passage below into a list of subject | relation | object lines.\n\n{p}",
        "{p}\n\nFrom the text above, extract all relations as subject | relation | object.",
    )),
}


class Item(NamedTuple):
    """A task item before phrasing: ``key`` decides its split (the molecule, the sequence, the passage or the
    item's original wording), ``kind`` names its phrasings, ``slots`` fill them."""

    key: str
    kind: str
    slots: dict[str, Any]
    completion: str
    meta: dict[str, Any]


def templates(kind: str, which: str = SEEN) -> tuple[str, ...]:
    """The ``"seen"`` or ``"unseen"`` templates of a task kind."""
    if kind not in TEMPLATES:
        raise ValueError(f"task kind {kind!r} has no phrasings; known kinds: {sorted(TEMPLATES)}")
    if which not in (SEEN, UNSEEN):
        raise ValueError(f"which must be {SEEN!r} or {UNSEEN!r}, got {which!r}")
    return TEMPLATES[kind][0 if which == SEEN else 1]


def check_request(domain: str, split: str, n: int, known: object) -> None:
    """Refuse a ``generate(domain, split, n)`` call whose domain is not in ``known``, whose split is not one
    of :data:`SPLITS` or whose ``n`` is negative."""
    if domain not in known:
        raise ValueError(f"domain {domain!r} is unknown; choose one of {list(known)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def which_for(split: str) -> str:
    """``test_unseen`` uses the unseen templates; every other split (train, validation, test) the seen ones."""
    return UNSEEN if split == "test_unseen" else SEEN


def phrase(kind: str, split: str, rng: random.Random, **slots: object) -> tuple[str, str]:
    """``(prompt, template_id)``: one template of ``kind`` for ``split``, picked with ``rng``, filled with
    ``slots``. The id is ``"<kind>/s<i>"`` (seen) or ``"<kind>/u<i>"`` (unseen)."""
    which = which_for(split)
    options = templates(kind, which)
    i = rng.randrange(len(options))
    return options[i].format(**slots), f"{kind}/{which[0]}{i}"


def template_of(template_id: str) -> str:
    """The template text behind an id from :func:`phrase`."""
    kind, _, tag = template_id.rpartition("/")
    return templates(kind, SEEN if tag[0] == "s" else UNSEEN)[int(tag[1:])]
