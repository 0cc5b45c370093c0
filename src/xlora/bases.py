"""What X-LoRA reads off a base model: hidden size, activation dtype, and its stack of decoder blocks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel


def decoder_layers(decoder: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(attribute, layers)`` of a decoder's stack of blocks (``layers`` in Llama-likes, ``h`` in GPT-2)."""
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return name, layers
    return None


@contextmanager
def first_layers(decoder: nn.Module, k: int | None) -> Iterator[None]:
    """Inside, ``decoder`` runs only its first ``k`` blocks (the same modules; ``None``: all of them).

    The decoder's forward loops over its block list and then applies the final norm, so a shorter
    list is a shallower model with the same weights. Not thread-safe: one forward at a time.
    """
    found = decoder_layers(decoder) if k is not None else None
    if found is None or k >= len(found[1]):
        yield
        return
    name, layers = found
    setattr(decoder, name, nn.ModuleList(list(layers)[:k]))
    try:
        yield
    finally:
        setattr(decoder, name, layers)


def check_scaling_pass_layers(k: int | None, base_model: PreTrainedModel) -> None:
    if k is None:
        return
    decoder = base_model.base_model
    found = decoder_layers(decoder) if decoder is not base_model else None
    if found is None:
        raise ValueError(f"scaling_pass_layers={k} needs a decoder with a list of blocks (`layers` or `h`); "
                         f"{type(base_model).__name__} has none: leave scaling_pass_layers=None")
    if k > len(found[1]):
        raise ValueError(f"scaling_pass_layers={k} exceeds the base model's {len(found[1])} decoder layers; "
                         f"use 1..{len(found[1])}, or None for all of them")


def float_dtype(model: PreTrainedModel) -> torch.dtype:
    """The base's activation dtype: its floating parameters' (a quantised base keeps norms and
    embeddings in it), float32 when it has none."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def hidden_size(model: PreTrainedModel) -> int:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_cfg, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size in {type(cfg).__name__}; X-LoRA needs a decoder with hidden_size")

