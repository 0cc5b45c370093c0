"""The scaling head: final hidden states of the scaling pass -> scalings ``[b, t, L, E]``."""

from __future__ import annotations

import torch
from torch import nn

from xlora.config import XLoraConfig


class ScalingHead(nn.Module):
    """An MLP over the scaling pass's last hidden state, then softmax and optional top-k.

    With ``h`` of shape ``[b, t, hidden]``:

        z = MLP(h)                                   # [b, t, E] or [b, t, L·E] (layerwise)
        z -> [b, t, L, E]                            # broadcast over L unless layerwise
        s = softmax(z / T) over E                    # if enable_softmax
        s = s ⊙ topk_mask(s, k)                      # if top_k
        s = softmax over the kept experts            # if enable_softmax_topk (others stay 0)

    The MLP is ``head_depth`` linear layers; between them ReLU and dropout (if
    ``head_relu_dropout``), hidden width ``head_hidden_size``. ``self.layers`` is an
    ``nn.Sequential`` with the same parameter names as PEFT's ``XLoraClassifier.layers``.
    """

    def __init__(self, config: XLoraConfig, hidden_size: int, num_layers: int, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.num_experts = num_experts
        out = num_experts * (num_layers if config.layerwise_scalings else 1)
        bias = config.head_bias
        mods: list[nn.Module] = []
        width = hidden_size
        for _ in range(config.head_depth - 1):
            mods.append(nn.Linear(width, config.head_hidden_size, bias=bias))
            width = config.head_hidden_size
            if config.head_relu_dropout:
                mods.append(nn.ReLU())
                if config.head_dropout > 0:
                    mods.append(nn.Dropout(config.head_dropout))
        mods.append(nn.Linear(width, out, bias=bias))
        self.layers = nn.Sequential(*mods)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw head outputs broadcast to ``[b, t, L, E]`` (a view when not layerwise)."""
        b, t, _ = hidden.shape
        z = self.layers(hidden)
        if self.config.layerwise_scalings:
            return z.reshape(b, t, self.num_layers, self.num_experts)  # [b, t, L, E]
        return z.unsqueeze(2).expand(b, t, self.num_layers, self.num_experts)  # [b, t, L, E]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        s = self.logits(hidden)
        if cfg.enable_softmax:
            s = torch.softmax(s / cfg.softmax_temperature, dim=-1)
        if cfg.top_k is not None and cfg.top_k < self.num_experts:
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(cfg.top_k, dim=-1).indices, True)
            if cfg.enable_softmax_topk:
                s = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
            else:
                s = s * keep
        elif cfg.enable_softmax_topk:
            s = torch.softmax(s, dim=-1)  # every expert is kept
        return s
