"""The scaling head: final hidden states of the scaling pass -> scalings ``[b, t, L, E]``; with
``head_prefix_mean`` its input also carries the running mean of the states (:class:`PrefixMeans`)."""

from __future__ import annotations

from typing import Any

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
    ``nn.Sequential`` with the same parameter names as PEFT's ``XLoraClassifier.layers``. With
    ``head_prefix_mean`` the input is :func:`head_input`'s ``[b, t, 2·hidden]`` instead of ``h``.
    """

    def __init__(self, config: XLoraConfig, hidden_size: int, num_layers: int, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.num_experts = num_experts
        out = num_experts * (num_layers if config.layerwise_scalings else 1)
        bias = config.head_bias
        mods: list[nn.Module] = []
        width = hidden_size * (2 if config.head_prefix_mean else 1)
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


class PrefixMeans:
    """Running means of the scaling pass's states over each sequence's real tokens, kept across decoding steps.

    With states ``h`` ``[b, t, hidden]`` and the attention mask ``m`` ``[b, t]`` of the new tokens,
    :meth:`extend` returns ``mean_{s<=t, m_s=1} h_s`` ``[b, t, hidden]`` (0 before a sequence's first real
    token) and appends the cumulative sums ``S`` ``[b, T, hidden]`` and counts ``C`` ``[b, T]`` (float32), so
    that a step of one token continues the prompt's sums exactly and a cache may be cropped to any length.
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [b, T, hidden]
        self.counts: torch.Tensor | None = None  # [b, T]

    def extend(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = hidden.shape
        m = torch.ones(b, t, device=hidden.device) if mask is None else mask[:, -t:].to(hidden.device)
        m = m.float()
        sums, counts = (hidden.float() * m[..., None]).cumsum(1), m.cumsum(1)
        if self.sums is not None:
            if self.sums.shape[0] != b:
                raise ValueError(f"the cache's running means hold {self.sums.shape[0]} sequences but the input "
                                 f"{b}: start a new cache for another batch")
            sums, counts = sums + self.sums[:, -1:], counts + self.counts[:, -1:]
            self.sums, self.counts = torch.cat([self.sums, sums], 1), torch.cat([self.counts, counts], 1)
        else:
            self.sums, self.counts = sums, counts
        return (sums / counts.clamp_min(1)[..., None]).to(hidden.dtype)

    def rows(self, fn: Any) -> None:
        """Apply a batch-axis operation (reorder, select, repeat) to both tensors."""
        if self.sums is not None:
            self.sums, self.counts = fn(self.sums), fn(self.counts)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``|tokens_to_remove|`` positions, as ``DynamicCache.crop`` (a negative count)."""
        if self.sums is not None and tokens_to_remove:
            keep = self.sums.shape[1] - abs(tokens_to_remove)
            self.sums, self.counts = self.sums[:, :keep], self.counts[:, :keep]

    def merge(self, other: PrefixMeans, length: int) -> None:
        """Append ``other``'s rows after these (``XLoraCache.merge_rows``), both left-padded with zeros to
        ``length`` positions: a padded position adds nothing to either sum."""
        if (self.sums is None) != (other.sums is None):
            raise ValueError("merge_rows: only one cache holds running means of the states")
        if self.sums is not None:
            def pad(x: torch.Tensor) -> torch.Tensor:
                return nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (length - x.shape[1], 0))

            self.sums = torch.cat([pad(self.sums), pad(other.sums)], 0)
            self.counts = torch.cat([pad(self.counts), pad(other.counts)], 0)

    def reset(self) -> None:
        self.sums = self.counts = None


def head_input(config: XLoraConfig, hidden: torch.Tensor, mask: torch.Tensor | None = None,
               prefix: PrefixMeans | None = None) -> torch.Tensor:
    """What the head reads: ``hidden`` itself, or with ``head_prefix_mean`` ``[h_t ; mean_{s<=t} h_s]``
    ``[b, t, 2·hidden]`` (``prefix`` carries the sums of earlier calls: a cache's; ``None``: this call's tokens)."""
    if not config.head_prefix_mean:
        return hidden
    return torch.cat([hidden, (prefix or PrefixMeans()).extend(hidden, mask)], -1)
