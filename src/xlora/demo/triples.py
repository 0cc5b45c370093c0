"""The strict triple line format of the ``graph`` expert, a parser that never crashes, and scoring.

One triple per line: ``subject | relation | object``. The parser accepts what a small model tends to
wrap around that (list bullets, numbering, surrounding brackets or quotes, a trailing full stop) and
counts every other non-empty line as malformed: wrong number of fields, an empty field, a field over
:data:`MAX_FIELD` characters, or no letter at all. Entities are merged by :func:`normalise`
(Unicode NFKC, case folded, whitespace collapsed, outer punctuation stripped).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

SEP = " | "
MAX_FIELD = 120
_BULLET = re.compile(r"^\s*(?:[-*\u2022>]+|\(?\d{1,3}[.):]|[a-z][.)])\s+", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u2028\u2029]")
_OUTER = " \t\"'`.,;:()[]{}<>"

Triple = tuple[str, str, str]


def format_triples(triples: list[Triple]) -> str:
    """The completion text of a list of triples: one ``subject | relation | object`` line each."""
    return "\n".join(SEP.join(t) for t in triples)


def normalise(text: str) -> str:
    """The merge key of an entity or relation: NFKC, case-folded, whitespace collapsed, outer punctuation off."""
    return _clean_field(text).casefold()


@dataclass
class ParseResult:
    """Triples in the order found (display forms, whitespace collapsed), and the malformed lines."""

    triples: list[Triple] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    duplicates: int = 0

    @property
    def n_malformed(self) -> int:
        return len(self.malformed)


def _clean_field(text: str) -> str:
    """The display form: NFKC, control characters out, whitespace collapsed, outer punctuation off."""
    return " ".join(_CONTROL.sub("", unicodedata.normalize("NFKC", text)).split()).strip(_OUTER)


def parse_line(line: str) -> Triple | None:
    """One line as a triple, or ``None`` when it is not one (see the module doc)."""
    line = _BULLET.sub("", _CONTROL.sub("", line)).strip()
    if line[:1] in "([{" and line[-1:] in ")]}":
        line = line[1:-1]
    parts = line.split("|")
    if len(parts) != 3:
        return None
    fields = tuple(_clean_field(p) for p in parts)
    if any(not f or len(f) > MAX_FIELD or not any(c.isalpha() for c in f) for f in fields):
        return None
    return fields  # type: ignore[return-value]


def is_filler(line: str) -> bool:
    """Blank lines and rules (``---``, ``***``, code fences): neither a triple nor a malformed line."""
    return not line.strip() or set(line.strip()) <= set("-=_*`#")


def parse_triples(text: str | None) -> ParseResult:
    """Every triple line of a model's output; malformed lines counted, duplicates (by :func:`normalise`) dropped.

    Never raises: ``None``, an empty string, binary junk or a truncated last line give what can be read.
    """
    result = ParseResult()
    seen: set[Triple] = set()
    for raw in (text or "").splitlines():
        if is_filler(raw):
            continue
        triple = parse_line(raw)
        if triple is None:
            result.malformed.append(raw[:200])
            continue
        key = key_of(triple)
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        result.triples.append(triple)
    return result


def key_of(triple: Triple) -> Triple:
    return tuple(normalise(x) for x in triple)  # type: ignore[return-value]


def prf(predicted: list[Triple], gold: list[Triple]) -> tuple[float, float, float]:
    """Precision, recall and F1 of ``predicted`` against ``gold``, matched by :func:`normalise` keys.

    Two empty sets give ``(1, 1, 1)``; an empty prediction against a non-empty gold set gives zeros.
    """
    p, g = {key_of(t) for t in predicted}, {key_of(t) for t in gold}
    if not p and not g:
        return 1.0, 1.0, 1.0
    hit = len(p & g)
    precision = hit / len(p) if p else 0.0
    recall = hit / len(g) if g else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return precision, recall, f1
