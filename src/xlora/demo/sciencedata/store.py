"""Resumable JSONL run files and the packed, gzip-compressed data files that ship.

A run appends one JSON object per line to a plain ``.jsonl`` file (flushed per line, so a killed
run loses at most the line being written) and a resumed run skips the keys already there. Skipped
inputs are appended too, as ``{"key": [...], "skipped": reason}`` lines, so a resumed run does not
retry them and the skip counts survive. ``pack`` writes the sorted records to ``.jsonl.gz``
(gzip with mtime 0, so the same records give the same bytes) atomically.
"""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Callable, Iterable
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a ``.jsonl`` or ``.jsonl.gz`` file; a torn last line (killed run) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RunFile:
    """An append-only JSONL file of records and skips, keyed by ``key(record)``."""

    def __init__(self, path: str | Path, key: Callable[[dict], tuple], resume: bool):
        self.path = Path(path)
        self.key = key
        if self.path.exists() and not resume:
            raise FileExistsError(f"{self.path} exists: pass --resume to continue it, or remove it to start over")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(self.path)
        self.done = {tuple(r["key"]) if "skipped" in r else key(r) for r in rows}
        self.skips = _skip_counts(rows)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — closed by close()

    def add(self, record: dict) -> None:
        self._write(record)
        self.done.add(self.key(record))

    def skip(self, key: tuple, reason: str) -> None:
        self._write({"key": list(key), "skipped": reason})
        self.done.add(tuple(key))
        self.skips[reason.split(":")[0]] += 1

    def _write(self, row: dict) -> None:
        self._f.write(json.dumps(row, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def records_and_skips(path: str | Path) -> tuple[list[dict], dict[str, int]]:
    """The records of a run file and its skip counts by reason (the text before the first ':')."""
    rows = read_jsonl(path)
    return [r for r in rows if "skipped" not in r], dict(sorted(_skip_counts(rows).items()))


def _skip_counts(rows: list[dict]) -> collections.Counter[str]:
    """Skip lines counted by reason (the text before the first ':')."""
    return collections.Counter(r["skipped"].split(":")[0] for r in rows if "skipped" in r)


def pack(records: Iterable[dict], path: str | Path, sort_key: Callable[[dict], tuple]) -> int:
    """Write ``records`` sorted by ``sort_key`` to gzip JSONL at ``path`` atomically; returns the count."""
    from xlora.files import atomic_write  # imports torch: only when packing, not in the long physics runs

    rows = sorted(records, key=sort_key)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            for row in rows:
                gz.write((json.dumps(row, sort_keys=True) + "\n").encode("utf-8"))

    atomic_write(Path(path), write)
    return len(rows)
