"""Reading training records: JSON lines one line at a time, other formats through Hugging Face ``datasets``.

Records are yielded in file order and never all held as text at once: a JSONL file is read line
by line, so memory grows with the longest line, not with the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Extensions handed to Hugging Face `datasets`: builder name and extra keyword arguments.
_DATASETS_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}), ".arrow": ("arrow", {}), ".txt": ("text", {}),
}


def require_file(path: str | Path, what: str) -> None:
    """Refuse a data file that is not there, naming the setting that gave it (``what``, e.g. "eval_file
    (--eval-file)"), before anything is loaded."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file); check the path")


def iter_records(path: str | Path) -> Iterator[dict]:
    """Yield the training records of ``path`` in file order.

    ``.jsonl`` (and ``.json`` files that are not a JSON array) are read as JSON lines, one object
    per line, blank lines skipped. Other formats (``.csv``, ``.tsv``, ``.parquet``, ``.arrow``,
    ``.txt``, ``.json`` arrays) go through ``datasets.load_dataset(builder, data_files=path)``.

    Raises:
        FileNotFoundError: ``path`` does not exist (raised at once, not on first iteration).
        ValueError: the extension is unknown (at once); the file holds no record, a line is not
            UTF-8, not valid JSON or not an object (when reached; the message gives the 1-based line).
        ImportError: a non-JSONL format was given and ``datasets`` is not installed.
    """
    path = Path(path)
    require_file(path, "data file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _starts_with_bracket(path)):
        return _json_lines(path)
    if suffix not in _DATASETS_FORMATS:
        raise ValueError(f"data file {str(path)!r} has extension {suffix!r}, which is not supported; use one of "
                         f"{sorted(['.jsonl', *_DATASETS_FORMATS])}")
    return iter(_read_with_datasets(path, *_DATASETS_FORMATS[suffix]))


def read_records(path: str | Path) -> list[dict]:
    """All records of ``path`` as a list (see :func:`iter_records`)."""
    return list(iter_records(path))


def _starts_with_bracket(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0] == "["
    return False


def _json_lines(path: Path) -> Iterator[dict]:
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)  # bytes: the encoding (UTF-8, with or without BOM) is detected
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid UTF-8 ({e}); save the file as UTF-8") from e
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e}); each line must be one JSON "
                                 f"object") from e
            del raw  # a long line is held once, as its parsed value
            if not isinstance(value, dict):
                raise ValueError(f"{path}: line {number} is a JSON {type(value).__name__}, not an object; each line "
                                 f"must be one record such as {{\"text\": \"...\"}}")
            count += 1
            yield value
    if count == 0:
        raise ValueError(f"data file {str(path)!r} is empty; it needs at least one record")


def _read_with_datasets(path: Path, builder: str, kwargs: dict[str, Any]) -> list[dict]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(f"reading {str(path)!r} ({path.suffix} files) needs Hugging Face datasets: "
                          f"`pip install datasets` (or `pip install xlora[train]`), or convert the file to "
                          f".jsonl") from e
    dataset = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    records = [dict(row) for row in dataset]
    if not records:
        raise ValueError(f"data file {str(path)!r} is empty; it needs at least one record")
    return records
