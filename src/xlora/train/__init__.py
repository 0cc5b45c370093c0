"""Training the scaling head: ``TrainConfig``, the data layer, the Accelerate trainer and checkpoints.

Modules: ``config`` (:class:`TrainConfig`), ``records`` (reading data files, streamed), ``data``
(tokenizing with loss masks, packing, batching), ``setup`` (load and check everything, then prepare
the output directory), ``trainer`` (the loop: one step, evaluation, checkpointing, the final save)
and ``checkpoints`` (atomic, crash-safe save and prune, resume). Needs the ``train`` extra
(``pip install xlora[train]``).
"""

from xlora.train.config import TrainConfig
from xlora.train.trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
