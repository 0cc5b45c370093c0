"""Training the scaling head: ``TrainConfig``, the data layer, the Accelerate trainer and checkpoints.

Needs the ``train`` extra (``pip install xlora[train]``).
"""

from xlora.train.config import TrainConfig
from xlora.train.trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
