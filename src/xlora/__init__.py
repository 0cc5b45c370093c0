"""X-LoRA: a mixture of LoRA experts over any Hugging Face causal language model."""

from xlora.config import XLoraConfig
from xlora.model import XLoraModel, XLoraOutput

__all__ = ["XLoraConfig", "XLoraModel", "XLoraOutput"]
__version__ = "0.1.0"
