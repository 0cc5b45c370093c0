"""What the format tests share: our model built directly with a random head, and its head's layers."""

from __future__ import annotations

import torch
from torch import nn

from xlora import XLoraConfig, XLoraModel


def build(setup, seed: int = 7, **cfg) -> XLoraModel:
    """Our model over ``setup``'s base and experts, head drawn at random (std 0.5) from ``seed``."""
    cfg.setdefault("head_hidden_size", 16)
    model = XLoraModel(setup.base(), XLoraConfig(experts={k: str(v) for k, v in setup.expert_dirs.items()}, **cfg))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def linears(model: XLoraModel) -> list[nn.Linear]:
    return [m for m in model.head.layers if isinstance(m, nn.Linear)]


def copy_head(model: XLoraModel, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> XLoraModel:
    """Load ``(weight, bias)`` pairs into the head's linear layers, in order."""
    with torch.no_grad():
        for mod, (w, b) in zip(linears(model), weights, strict=True):
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
    return model
