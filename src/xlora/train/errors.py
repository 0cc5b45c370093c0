"""The error every training module raises: a leaf module that ``setup``, ``fsdp`` and ``trainer`` all import."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what to do)."""
