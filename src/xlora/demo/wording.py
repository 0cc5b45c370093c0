"""The wording composer: prompts built from independent parts, with whole frame families and alias sets held out.

A prompt of a task kind is composed from

- a **frame** of one **frame family** (question, imperative, label, request, ... — :mod:`xlora.demo._wording_data`);
- **parts** the frame names: an intent verb (``{verb}``), a property alias (``{prop}``: "molar mass" /
  "molecular weight" / "MW"), what the content is (``{thing}``), a unit clause and the unit's spelling, a
  decimals instruction, a range constraint (``{want}``), an equation's variable (``{v}``: x, y, n, ...);
- a domain-neutral **context** sentence and **closing** (or none), a **casing** (as written / lower / upper) and an
  **ending** (the final ``.``/``?`` kept or dropped);
- the item's **content slots** (the SMILES, the sequence, the expression), which no casing touches.

Every pool is split into seen and unseen entries. ``train``, ``validation`` and ``test`` draw from the
seen ones; ``test_unseen`` only from the unseen ones: its frames come from held-out families, its property
aliases from held-out alias sets, its verbs, nouns, units, contexts and variables from held-out lists. The
old kinds whose wording is a fixed template list (:mod:`xlora.demo.phrasings`: arithmetic, modulo,
fractions, general, graph) get families from those templates: the seen templates split into
``question`` and ``imperative`` families, the unseen ones form the held-out ``unseen`` family.

:func:`compose` is a pure function of its arguments (the caller's seeded ``random.Random``).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any

from xlora.demo import _wording_data as vocab
from xlora.demo import phrasings
from xlora.demo.phrasings import SEEN, UNSEEN, which_for

PARTS = ("verb", "prop", "thing", "unit_clause", "unit_word", "dec", "want", "v", "eqn")
_PART = re.compile(r"\{(" + "|".join(PARTS) + r")\}")
CASINGS = tuple(dict.fromkeys(vocab.CASINGS[0] + vocab.CASINGS[1]))  # every casing, seen or not
CONTENT_PARTS = ("v",)  # chosen like a part, filled like content: no casing touches an equation's variable


@dataclass(frozen=True)
class KindSpec:
    """How a task kind is worded: its frame class (a key of ``FRAMES``, or ``"phrasings"`` for the fixed
    templates of :mod:`xlora.demo.phrasings`), the noun class of its content and its verb class."""

    frames: str
    noun: str = ""
    verbs: str = ""


KINDS: dict[str, KindSpec] = {
    **{k: KindSpec("forward", noun, "forward") for k, noun in (
        ("protein_forward", "peptide"), ("chem_value", "molecule"), ("qm_forward", "molecule"),
        ("measured", "molecule"), ("mech_forward", "peptide"))},
    "chem_count": KindSpec("count", "molecule", "count"),
    **{k: KindSpec("design", noun, "design") for k, noun in (
        ("protein_inverse", "peptide"), ("chem_inverse", "molecule"), ("qm_inverse", "molecule"),
        ("mech_inverse", "peptide"))},
    "linear": KindSpec("linear"),
    **{k: KindSpec("phrasings") for k in ("arith", "mod", "frac", "capital", "antonym", "upper", "sort", "count",
                                          "next", "date", "words", "graph")},
}


@dataclass(frozen=True)
class Wording:
    """A composed prompt and how it was made.

    Attributes:
        prompt: the text a model sees.
        template: the prompt with its content slots unfilled (``{x}``, ``{lo}``, ...): the surface form.
        family: ``"<frame class or kind>/<family>"``; ``frame``: ``"<kind>/<family>/<index>"``.
        which: ``"seen"`` or ``"unseen"``.
        parts: the part values used (``{"prop": "molar mass", "v": "y", ...}``), plus ``context``,
            ``casing`` and ``ending``.
    """

    prompt: str
    template: str
    family: str
    frame: str
    which: str
    parts: dict[str, str] = field(default_factory=dict)


def families(kind: str, wide: bool = False) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...], str]:
    """``(family -> frames, held-out family names, family prefix)`` of a task kind; ``wide``: with the head-only
    families of ``WIDE_FRAMES`` among the seen ones."""
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r} has no wording; known kinds: {sorted(KINDS)}")
    spec = KINDS[kind]
    if spec.frames != "phrasings":
        extra = vocab.WIDE_FRAMES.get(spec.frames, {}) if wide else {}
        return {**vocab.FRAMES[spec.frames], **extra}, vocab.HELD_OUT_FAMILIES[spec.frames], spec.frames
    seen, unseen = phrasings.TEMPLATES[kind]
    fams = {"question": tuple(t for t in seen if t.rstrip().endswith("?")),
            "imperative": tuple(t for t in seen if not t.rstrip().endswith("?")), "unseen": unseen}
    return {f: ts for f, ts in fams.items() if ts}, ("unseen",), kind


def _pool(pool: vocab.Pool, which: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The seen entries (with ``extra``, the head-only ones, when wide) or the unseen ones."""
    return pool[0] + extra if which == SEEN else pool[1]


def _part(name: str, spec: KindSpec, slots: dict[str, Any], which: str, wide: bool = False) -> tuple[str, ...]:
    """The options of one part for this kind, item and wording side (``wide``: plus the head-only entries)."""
    if name == "verb":
        return _pool(vocab.VERBS[spec.verbs], which, vocab.WIDE_VERBS.get(spec.verbs, ()) if wide else ())
    if name == "prop":
        if slots.get("prop") not in vocab.PROPERTY_ALIASES:
            raise ValueError(f"slot 'prop'={slots.get('prop')!r} names no property; known: {sorted(vocab.PROPERTY_ALIASES)}")
        return _pool(vocab.PROPERTY_ALIASES[slots["prop"]], which, vocab.WIDE_ALIASES[slots["prop"]] if wide else ())
    if name == "thing":
        table = vocab.DESIGN_THINGS if spec.frames == "design" else vocab.THINGS
        return _pool(table[spec.noun], which)
    if name == "unit_clause":
        return ("",) if not slots.get("unit") else _pool(vocab.UNIT_CLAUSE, which)
    if name == "unit_word":
        return _pool(vocab.UNITS[slots.get("unit", "")], which)
    if name == "dec":
        return _pool(vocab.DECIMALS, which)
    if name == "want":
        return _pool(vocab.EXACT if slots.get("exact") else vocab.RANGES, which)
    if name == "v":
        return _pool(vocab.VARIABLES, which)
    return _pool(vocab.EQUATIONS, which)  # "eqn"


def _resolve(text: str, spec: KindSpec, slots: dict[str, Any], which: str, rng: random.Random,
             chosen: dict[str, str], wide: bool = False) -> str:
    """Fill the parts of ``text`` (parts may contain parts), leaving the content slots as ``{name}``."""
    for _ in range(len(PARTS) + 1):
        names = sorted(set(_PART.findall(text)))
        if not names:
            return text
        for name in names:
            if name not in chosen:
                chosen[name] = rng.choice(_part(name, spec, slots, which, wide))
        if all(n in CONTENT_PARTS for n in names):
            return text
        text = _PART.sub(lambda m: m.group(0) if m.group(1) in CONTENT_PARTS else chosen[m.group(1)], text)
    raise ValueError(f"parts nest too deep in {text!r}")


def _restyle(template: str, casing: str, ending: str) -> str:
    """Casing on the literal text only (content slots untouched), tidy spaces, then the ending."""
    pieces = []
    start = True  # at a sentence start
    for literal, name, spec, conv in string.Formatter().parse(template):
        lit = re.sub(r" +", " ", literal.replace(" .", ".").replace(" ,", ","))
        if casing == "lower":
            lit = lit.lower()
        elif casing == "upper":
            lit = lit.upper()
        else:  # as written, each sentence starting with a capital
            lit = re.sub(r"(^|[.?!:]\s+|\n)([a-z])", lambda m: m.group(1) + m.group(2).upper(), lit) if start \
                else re.sub(r"([.?!:]\s+|\n)([a-z])", lambda m: m.group(1) + m.group(2).upper(), lit)
        pieces.append(lit)
        if name is not None:
            pieces.append("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}")
        start = False
    text = "".join(pieces).strip()
    if ending == "drop" and text[-1:] in ".?" and not text.endswith("}"):
        text = text[:-1].rstrip()
    return text


def compose(kind: str, split: str, rng: random.Random, slots: dict[str, Any],
            casings: tuple[str, ...] | None = None, wide: bool = False) -> Wording:
    """Compose a prompt of ``kind`` for ``split`` (see the module doc) around the item's ``slots``.

    ``slots`` holds the content slots the frames name (``x``, ``n``, ``lo``, ``hi``, ``decimals``, ``e``, ...)
    and the item's ``prop`` (a key of ``PROPERTY_ALIASES``), ``unit`` (a key of ``UNITS``) and, for
    inverse tasks, ``exact`` (an exact count instead of a range). ``casings``: draw the casing from these
    instead of the split's pool (the scaling head's data takes all of :data:`CASINGS`; every other part
    keeps its split's pool). ``wide``: a seen split also draws from the head-only entries of
    :mod:`~xlora.demo._wording_data` (``WIDE_*``: more aliases, verbs, contexts, closings and frame families);
    an unseen split is unchanged.

    Raises:
        ValueError: an unknown kind, property, casing, or a frame slot that ``slots`` lacks (named).
    """
    if casings is not None and (not casings or set(casings) - set(CASINGS)):
        raise ValueError(f"casings={casings!r}: give a non-empty tuple drawn from {CASINGS}")
    which = which_for(split)
    wide = wide and which == SEEN
    fams, held, prefix = families(kind, wide)
    spec = KINDS[kind]
    names = sorted(f for f in fams if (f in held) == (which == UNSEEN))
    family = rng.choice(names)
    index = rng.randrange(len(fams[family]))
    chosen: dict[str, str] = {}
    body = _resolve(fams[family][index], spec, slots, which, rng, chosen, wide)
    context = rng.choice(_pool(vocab.CONTEXTS, which, vocab.WIDE_CONTEXTS if wide else ()))
    closing = rng.choice(_pool(vocab.CLOSINGS, which, vocab.WIDE_CLOSINGS if wide else ()))
    casing, ending = rng.choice(casings or _pool(vocab.CASINGS, which)), rng.choice(_pool(vocab.ENDINGS, which))
    sep = "\n" if "\n" in body else " "
    text = (context + sep if context else "") + body.strip() + (sep + closing if closing else "")
    template = _restyle(text, casing, ending)
    try:
        prompt = template.format(**slots, **{p: chosen[p] for p in CONTENT_PARTS if p in chosen})
    except KeyError as e:
        raise ValueError(f"kind {kind!r}: frame {fams[family][index]!r} needs slot {e.args[0]!r}, which the item "
                         f"lacks (slots: {sorted(slots)})") from None
    return Wording(prompt, template, f"{prefix}/{family}", f"{kind}/{family}/{index}", which,
                   {**chosen, "context": context, "closing": closing, "casing": casing, "ending": ending})


def held_out_phrases(kind: str, props: tuple[str, ...] = (), units: tuple[str, ...] = ()) -> set[str]:
    """The held-out words of ``kind`` (lower-cased): its unseen contexts, verbs, nouns, the unseen alias sets of
    ``props`` and unseen spellings of ``units``. None of them may occur in a seen prompt's wording."""
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r} has no wording; known kinds: {sorted(KINDS)}")
    spec, out = KINDS[kind], set(vocab.CONTEXTS[1]) | set(vocab.CLOSINGS[1])
    out |= set(vocab.VERBS[spec.verbs][1]) if spec.verbs else set()
    if spec.frames in ("forward", "count", "design"):
        out |= set((vocab.DESIGN_THINGS if spec.frames == "design" else vocab.THINGS)[spec.noun][1])
    for p in props:
        out |= set(vocab.PROPERTY_ALIASES[p][1])
    for u in units:
        out |= set(vocab.UNITS[u][1])
    return {p.lower() for p in out if p}
