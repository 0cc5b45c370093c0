"""Operations on whole X-LoRA directories that need the model class: loading one for inference
with its tokenizer, converting between formats and exporting to mistral.rs.

They sit above :mod:`xlora.model` (which sits above :mod:`xlora.saving` and :mod:`xlora.formats`),
so the formats return plain data and never build a model themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xlora import formats
from xlora.formats import mistralrs
from xlora.model import XLoraModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_model_and_tokenizer(directory: str | os.PathLike, base_model: str | None = None,
                             **model_kwargs: Any) -> tuple[XLoraModel, Any]:
    """Load an X-LoRA directory for inference (``eval()``), with the tokenizer saved in it or the base model's."""
    from transformers import AutoTokenizer

    model = XLoraModel.from_pretrained(directory, base_model=base_model, **model_kwargs).eval()
    candidates = [Path(directory), base_model or model.xlora_config.base_model_name_or_path]
    for cand in candidates:
        if cand and Path(cand).is_dir() and any((Path(cand) / f).is_file() for f in TOKENIZER_FILES):
            return model, AutoTokenizer.from_pretrained(str(cand))
    raise FileNotFoundError(
        f"no tokenizer in {str(directory)!r} nor in the base model folder {str(candidates[1])!r}; "
        "save one next to the model with tokenizer.save_pretrained(dir)"
    )


def convert(src: str | os.PathLike, dst: str | os.PathLike, base_model: Any = None, to: str = "ours",
            ordering: str | os.PathLike | None = None, overwrite: bool = False) -> str:
    """Read ``src`` (any format) and write it to ``dst`` in format ``to`` (experts bundled); returns ``src``'s format.

    Raises:
        ValueError: ``dst`` is ``src``, a file, or a non-empty folder without ``overwrite`` (checked before loading).
    """
    out = Path(dst)
    if out.resolve() == Path(src).resolve():
        raise ValueError(f"dst {str(dst)!r} is the source folder; converting in place would mix two formats in "
                         "one folder: give a new folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"dst {str(dst)!r} is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"dst {str(dst)!r} is not empty; give a new folder or pass overwrite=True (--overwrite)")
    kind = "mistralrs" if ordering is not None else formats.detect(src)
    model = XLoraModel.from_pretrained(src, base_model=base_model, ordering=ordering)
    model.save_pretrained(dst, bundle=True, format=to)
    return kind


def export_mistralrs(directory: str | os.PathLike, out: str | os.PathLike, base_model: str | None = None,
                     **kwargs: Any) -> str:
    """Load an X-LoRA directory (any format) and :func:`xlora.formats.mistralrs.export` it; returns the
    ``mistralrs serve`` command line. ``kwargs`` go to ``export`` (``base_model_id``, ``tgt_non_granular_index``)."""
    model = XLoraModel.from_pretrained(directory, base_model=base_model).eval()
    if kwargs.get("base_model_id") is None and base_model is not None:
        kwargs["base_model_id"] = str(base_model)
    return mistralrs.export(model, out, **kwargs)
