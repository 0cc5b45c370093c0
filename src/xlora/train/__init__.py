"""Training the scaling head: ``TrainConfig``, the data layer, the Accelerate trainer and checkpoints.

Modules: ``config`` (:class:`TrainConfig`), ``records`` (reading data files, streamed), ``data``
(tokenizing with loss masks, packing, collating), ``batching`` (the epoch's batch order), ``setup`` (load
and check everything, then prepare the output directory), ``trainer`` (the loop: one step, evaluation,
checkpointing, the final save), ``losses`` (token loss, scalings regularizers), ``routing`` (the optional
routing-supervision term), ``checkpoints`` (atomic, crash-safe save and prune, resume), ``loop_checkpoint``
(one-file checkpoints of a small loop, and the stop request) and ``distill``
with ``distill_config`` and ``distill_losses`` (a head trained on a teacher head's scalings, optionally with routing
labels: a shallow scaling pass's head, or a trained head corrected; ``xlora distill``). Needs the ``train``
extra (``pip install xlora[train]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xlora.train.config import TrainConfig
    from xlora.train.trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
_HOME = {"TrainConfig": "xlora.train.config", "TrainResult": "xlora.train.trainer",
         "TrainingError": "xlora.train.trainer", "train": "xlora.train.trainer"}


def __getattr__(name: str) -> Any:
    """The public names on first use (PEP 562): ``xlora train --help`` reads TrainConfig without torch."""
    if name not in _HOME:
        raise AttributeError(f"module 'xlora.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
