"""X-LoRA: a mixture of LoRA experts over any Hugging Face causal language model.

The public names are loaded on first use (PEP 562 module ``__getattr__``), so ``import xlora`` and
``xlora --help`` do not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xlora.config import XLoraConfig
    from xlora.model import XLoraModel, XLoraOutput

__all__ = ["XLoraConfig", "XLoraModel", "XLoraOutput"]
__version__ = "0.1.0"
_HOME = {"XLoraConfig": "xlora.config", "XLoraModel": "xlora.model", "XLoraOutput": "xlora.model"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'xlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
