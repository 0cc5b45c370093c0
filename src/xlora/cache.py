"""The dual KV cache of X-LoRA decoding: :class:`XLoraCache` *is* the main pass's ``DynamicCache`` and owns the
scaling pass's cache, and every cache operation transformers calls (``reorder_cache`` for beams, ``crop``,
``batch_repeat_interleave``, ``batch_select_indices``, ``reset``) is applied to both, and to the prompt-granularity
state (the fixed scalings ``[b, 1, L, E]`` and the experts folded with them) and the head's running means. Used by :mod:`xlora.generation`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from xlora.head import PrefixMeans
from xlora.sparse import FoldedExperts

Granularity = Literal["token", "prompt"]
PromptReduce = Literal["last", "mean"]


class XLoraCache(DynamicCache):
    """The main pass's KV cache, carrying the scaling pass's cache and the decoding mode.

    Args:
        config: the base model's config (as for ``DynamicCache``).
        granularity: ``"token"`` (scalings for every token) or ``"prompt"`` (fixed after the prompt).
        prompt_scalings: with ``"prompt"`` granularity, ``"last"`` prompt token or ``"mean"`` over the prompt.
    """

    def __init__(self, config: Any = None, granularity: Granularity = "token",
                 prompt_scalings: PromptReduce = "last") -> None:
        if granularity not in ("token", "prompt"):
            raise ValueError(f"granularity must be 'token' or 'prompt', got {granularity!r}")
        if prompt_scalings not in ("last", "mean"):
            raise ValueError(f"prompt_scalings must be 'last' or 'mean', got {prompt_scalings!r}")
        super().__init__(config=config)
        self.scaling_cache = DynamicCache(config=config)
        self.granularity = granularity
        self.prompt_scalings = prompt_scalings
        self.fixed_scalings: torch.Tensor | None = None  # [b, 1, L, E] with prompt granularity
        # per adapted module, its chosen experts with fixed_scalings folded in (a top-k head only; built at the
        # first decoding step)
        self.folded: tuple[FoldedExperts | None, ...] | None = None
        self.prefix = PrefixMeans()  # the running means of the scaling pass's states (a head_prefix_mean head)

    def _folded_rows(self, fn: Any) -> None:
        if self.folded is not None:
            self.folded = tuple(None if f is None else f.rows(fn) for f in self.folded)

    # -- every operation transformers applies to a cache is applied to both caches
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.scaling_cache.reorder_cache(beam_idx)
        self.prefix.rows(lambda t: t.index_select(0, beam_idx.to(t.device)))
        if self.fixed_scalings is not None:
            self.fixed_scalings = self.fixed_scalings.index_select(0, beam_idx.to(self.fixed_scalings.device))
        self._folded_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.scaling_cache.crop(tokens_to_remove)
        self.prefix.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.scaling_cache.batch_repeat_interleave(repeats)
        self.prefix.rows(lambda t: t.repeat_interleave(repeats, dim=0))
        if self.fixed_scalings is not None:
            self.fixed_scalings = self.fixed_scalings.repeat_interleave(repeats, dim=0)
        self._folded_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.scaling_cache.batch_select_indices(indices)
        self.prefix.rows(lambda t: t[indices])
        if self.fixed_scalings is not None:
            self.fixed_scalings = self.fixed_scalings[indices]
        self._folded_rows(lambda t: t[indices])

    def can_merge(self) -> bool:
        """Whether :meth:`merge_rows` applies: plain dynamic layers in both caches."""
        layers = list(self.layers) + list(self.scaling_cache.layers)
        return all(type(layer) is DynamicLayer for layer in layers)

    def merge_rows(self, other: XLoraCache) -> tuple[int, int]:
        """Append the batch rows of ``other`` after this cache's rows (continuous batching in the server).

        Both caches hold ``[b, heads, t, d]`` keys and values per layer; the shorter one is left-padded
        with zeros along ``t`` so both have ``T = max(t_self, t_other)``. The padded positions must be
        masked by the caller (attention mask 0), which makes them invisible to attention.

        Returns:
            ``(pad_self, pad_other)``: the columns of zeros added on the left of each cache's rows.
        Raises:
            ValueError: a cache holds layers other than plain ``DynamicLayer`` (sliding window, static,
                quantised), the layer counts differ, or only one cache has prompt-granularity scalings.
        """
        if not (self.can_merge() and other.can_merge()):
            raise ValueError("merge_rows needs plain dynamic cache layers in both caches")
        if len(self.layers) != len(other.layers) or (self.fixed_scalings is None) != (other.fixed_scalings is None):
            raise ValueError("merge_rows: the caches come from different models or decoding modes")
        t_self, t_other = self.get_seq_length(), other.get_seq_length()
        t = max(t_self, t_other)
        for mine, theirs in ((self, other), (self.scaling_cache, other.scaling_cache)):
            for a, b in zip(mine.layers, theirs.layers):
                if not (a.is_initialized or b.is_initialized):  # a scaling pass of k < N layers leaves the rest empty
                    continue
                a.keys = torch.cat([_left_pad(a.keys, t), _left_pad(b.keys, t)], dim=0)
                a.values = torch.cat([_left_pad(a.values, t), _left_pad(b.values, t)], dim=0)
        if self.fixed_scalings is not None:
            self.fixed_scalings = torch.cat([self.fixed_scalings, other.fixed_scalings], dim=0)
        self.prefix.merge(other.prefix, t)
        self.folded = None  # folded again from the merged fixed scalings at the next step
        return t - t_self, t - t_other

    def reset(self) -> None:
        super().reset()
        self.scaling_cache.reset()
        self.prefix.reset()
        self.fixed_scalings = None
        self.folded = None


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[b, h, t, d]`` -> ``[b, h, length, d]`` with zeros before the ``t`` cached positions."""
    return x if x.shape[-2] == length else torch.nn.functional.pad(x, (0, 0, length - x.shape[-2], 0))
