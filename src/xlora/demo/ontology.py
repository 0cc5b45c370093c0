"""A small ontology of materials, proteins and mechanics, and the synthetic passages of the ``graph`` domain.

Entities have a type; relations connect a subject type to an object type and are written in passages
through several surface forms ("adopts a ... structure" for *has secondary structure*). A passage is
two to four sentences, each built from a *sentence shape* stating one or two triples; the completion
lists the triples, one ``subject | relation | object`` line each, in the order they are stated.

Held out (``test`` and ``test_unseen``): about a fifth of the entities of every type (chosen by a hash
of the name) and three of the eight sentence shapes. Training and validation passages use only the
other entities and shapes, so test passages never share an entity or a sentence shape with training.
"""

from __future__ import annotations

import hashlib
import random

from xlora.demo.triples import Triple

ENTITIES: dict[str, tuple[str, ...]] = {
    "material": (
        "silk fibroin", "spider silk", "collagen", "keratin", "chitin", "cellulose", "nacre", "bone", "tooth enamel",
        "graphene", "carbon nanotube yarn", "Kevlar", "elastin", "resilin", "amyloid fiber", "titanium alloy",
        "mussel byssus", "wood", "bamboo", "cartilage", "tendon", "squid beak", "hagfish slime",
        "sea sponge glass", "lobster cuticle", "fish scale", "hydrogel", "silicon carbide", "dentin", "horn",
    ),
    "protein": (
        "lysozyme", "hemoglobin", "myoglobin", "insulin", "actin", "myosin", "titin", "tubulin", "fibronectin",
        "laminin", "albumin", "ferritin", "ubiquitin", "spidroin", "tropoelastin", "sericin", "amelogenin",
        "vimentin", "lamin", "talin", "vinculin", "dystrophin", "fibrinogen", "reflectin", "suckerin",
    ),
    "structure": (
        "alpha helix", "beta sheet", "random coil", "triple helix", "beta turn", "coiled coil", "beta barrel",
        "polyproline helix", "beta solenoid", "cross-beta spine",
    ),
    "property": (
        "tensile strength", "toughness", "stiffness", "elasticity", "hardness", "ductility", "fracture resistance",
        "thermal stability", "extensibility", "fatigue resistance", "impact resistance", "damping",
        "self-healing", "biocompatibility", "creep resistance", "wear resistance", "yield strength",
    ),
    "mechanism": (
        "hydrogen bonding", "covalent crosslinking", "crystallization", "mineralization", "self-assembly",
        "denaturation", "plastic deformation", "crack deflection", "strain hardening", "sacrificial bonding",
        "hierarchical packing", "fibril sliding", "metal coordination", "water plasticization", "disulfide bridging",
        "microcracking", "phase separation",
    ),
    "organism": (
        "silkworms", "orb-weaving spiders", "cattle", "sheep", "mussels", "squid", "hagfish", "lobsters",
        "abalone", "termites", "jellyfish", "honeybees", "caddisfly larvae", "sea urchins", "velvet worms",
    ),
    "application": (
        "surgical sutures", "body armor", "tissue scaffolds", "drug delivery", "bulletproof vests",
        "flexible electronics", "artificial tendons", "bone implants", "wound dressings", "protective coatings",
        "textile fibers", "soft robotics", "water filtration", "acoustic insulation",
    ),
}

# relation -> (subject types, object type, surface forms (text before the object, text after it))
RELATIONS: dict[str, tuple[tuple[str, ...], str, tuple[tuple[str, str], ...]]] = {
    "has secondary structure": (("protein", "material"), "structure",
                                (("adopts the", " structure"), ("folds into the", " conformation"), ("is rich in", " motifs"))),
    "is made of": (("material",), "protein", (("is made of", ""), ("is composed mainly of", ""), ("consists of", ""))),
    "has property": (("material",), "property", (("shows high", ""), ("is known for its", ""), ("exhibits remarkable", ""))),
    "is produced by": (("material", "protein"), "organism", (("is produced by", ""), ("is secreted by", ""))),
    "is used for": (("material",), "application", (("is used for", ""), ("finds use in", ""))),
    "increases": (("mechanism",), "property", (("increases", ""), ("enhances", ""), ("raises the", ""))),
    "decreases": (("mechanism",), "property", (("decreases", ""), ("reduces", ""), ("lowers the", ""))),
    "is stabilized by": (("structure", "material"), "mechanism", (("is stabilized by", ""), ("is held together by", ""))),
    "interacts with": (("protein",), "protein", (("interacts with", ""), ("binds to", ""))),
}

# sentence shapes: {s} subject, {v}/{o}/{w} first surface prefix, object, suffix; {v2}/{o2}/{w2} a second triple
ONE, TWO = 1, 2
SHAPES_TRAIN: tuple[tuple[str, int], ...] = (
    ("{S} {v} {o}{w}.", ONE),
    ("Studies show that {s} {v} {o}{w}.", ONE),
    ("{S} {v} {o}{w}, and it also {v2} {o2}{w2}.", TWO),
    ("In many reports, {s} {v} {o}{w}.", ONE),
    ("{S} {v} {o}{w}; this was confirmed by experiments.", ONE),
)
SHAPES_HELD_OUT: tuple[tuple[str, int], ...] = (
    ("According to recent measurements, {s} clearly {v} {o}{w}.", ONE),
    ("Notably, {s} (a well-studied system) {v} {o}{w} while it {v2} {o2}{w2}.", TWO),
    ("It has long been observed that {s} {v} {o}{w}.", ONE),
)


def _held_out(name: str) -> bool:
    """About a fifth of the entities are held out for the test passages (by a hash of the name)."""
    return int(hashlib.sha256(f"graph-entity:{name}".encode()).hexdigest()[:8], 16) % 5 == 0


def entities(kind: str, held_out: bool) -> tuple[str, ...]:
    """The entities of a type on one side of the split."""
    return tuple(e for e in ENTITIES[kind] if _held_out(e) == held_out)


def _pick_triple(rng: random.Random, held_out: bool, subject: str | None = None,
                 subject_kind: str | None = None) -> tuple[Triple, tuple[str, str]]:
    """A random well-typed triple (optionally about ``subject`` of ``subject_kind``) and its surface form."""
    options = [r for r, (kinds, _, _) in RELATIONS.items() if subject_kind is None or subject_kind in kinds]
    relation = rng.choice(sorted(options))
    kinds, obj_kind, forms = RELATIONS[relation]
    if subject is None:
        subject = rng.choice(entities(rng.choice(kinds), held_out))
    obj = rng.choice([e for e in entities(obj_kind, held_out) if e != subject])
    return (subject, relation, obj), rng.choice(forms)


def _kind_of(entity: str) -> str:
    return next(k for k, names in ENTITIES.items() if entity in names)


def _sentence(rng: random.Random, held_out: bool, seen: set[Triple]) -> tuple[str, list[Triple]]:
    template, n = rng.choice(SHAPES_HELD_OUT if held_out else SHAPES_TRAIN)
    first, (v, w) = _pick_triple(rng, held_out)
    triples, slots = [first], {"s": first[0], "S": first[0][0].upper() + first[0][1:], "v": v, "o": first[2], "w": w}
    if n == TWO:
        for _ in range(20):
            second, (v2, w2) = _pick_triple(rng, held_out, first[0], _kind_of(first[0]))
            if second[2] != first[2]:
                break
        triples.append(second)
        slots.update(v2=v2, o2=second[2], w2=w2)
    triples = [t for t in triples if t not in seen]
    return template.format(**slots), triples


def passage(rng: random.Random, held_out: bool) -> tuple[str, list[Triple]]:
    """A passage of 2-4 sentences and the triples it states, in order (duplicates stated once).

    ``held_out``: draw entities and sentence shapes from the held-out side (test) or the training side.
    """
    sentences, triples = [], []
    for _ in range(rng.randint(2, 4)):
        text, new = _sentence(rng, held_out, set(triples))
        sentences.append(text)
        triples += new
    return " ".join(sentences), triples
