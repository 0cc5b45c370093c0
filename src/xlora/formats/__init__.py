"""Other X-LoRA formats, in and out.

| format      | read | write | where |
|-------------|------|-------|-------|
| ``ours``      | yes | yes | :mod:`xlora.saving` |
| ``original``  | yes | yes | the original ``xlora`` package (both layouts), :mod:`.original` |
| ``peft``      | yes | yes | PEFT's ``XLORA`` save, :mod:`.peft_xlora` |
| ``mistralrs`` | yes | yes | mistral.rs's folder + ordering file, :mod:`.mistralrs` |

``XLoraModel.from_pretrained(dir)`` detects the format; ``save_pretrained(dir, format=...)`` and
``xlora convert SRC DST`` write one; ``xlora export-mistralrs DIR OUT`` writes mistral.rs's layout
and prints the command that serves it. Readers return plain data (:class:`Foreign`: a config and
the head's tensors) and writers take a built model: nothing here imports the model class
(:func:`xlora.saving.load_model` builds it; conversions live in :mod:`xlora.pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xlora.formats import mistralrs, original, peft_xlora
from xlora.formats._common import Foreign, attach_head, read_json

FORMATS = ("ours", "original", "peft", "mistralrs")
__all__ = ["FORMATS", "Foreign", "attach_head", "detect", "read", "save"]


def detect(directory: str | os.PathLike) -> str:
    """The format of an X-LoRA directory: ``"ours"``, ``"original"``, ``"peft"`` or ``"mistralrs"``.

    A folder holding none of them is reported as ``"ours"``, whose loader names what is missing.
    """
    d = Path(directory)
    config = d / original.CONFIG_FILE
    if config.is_file():
        data = read_json(config, "X-LoRA config file")
        if not original.is_original(data):
            return "ours"
        return "mistralrs" if mistralrs.find_ordering(d) is not None else "original"
    peft_config = d / peft_xlora.PEFT_CONFIG
    if peft_config.is_file():
        kind = read_json(peft_config, "PEFT adapter config").get("peft_type")
        if kind == "XLORA":
            return "peft"
        raise ValueError(f"{str(d)!r} holds a PEFT {kind} adapter, not an X-LoRA model: use it as one of the experts")
    return "ours"


def read(directory: str | os.PathLike, kind: str | None = None, ordering: str | os.PathLike | None = None) -> Foreign:
    """Read a foreign-format directory (without its base model)."""
    d = Path(directory)
    kind = kind or detect(d)
    if kind == "original":
        return original.read(d)
    if kind == "peft":
        return peft_xlora.read(d)
    if kind == "mistralrs":
        return mistralrs.read(d, ordering)
    raise ValueError(f"format {kind!r} is not a foreign format; choose one of {list(FORMATS[1:])}")


def save(model: Any, directory: str | os.PathLike, format: str, bundle: bool = False) -> None:
    """Write ``model`` in a foreign ``format`` (``"original"``, ``"peft"`` or ``"mistralrs"``)."""
    if format == "original":
        original.save(model, directory)
    elif format == "peft":
        peft_xlora.save(model, directory, bundle=bundle)
    elif format == "mistralrs":
        mistralrs.export(model, directory)
    else:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
