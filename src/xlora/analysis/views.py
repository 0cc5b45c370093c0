"""What every view of the mixture shows: one token convention and one way to name and group modules.

**Tokens: "which expert wrote this token".** Row ``t`` of a sequence's scalings ``[T, L, E]`` is the
mixture applied while *reading* token ``t``; its logits chose token ``t + 1``. Every view (``xlora
inspect``'s token heatmap, coloured prompt/answer and generation plot, ``xlora generate
--show-experts``, the demo's coloured answers and heatmaps, ``xlora dialogue``'s turns, ``xlora
graph``'s edges) shows token ``t + 1`` with row ``t``. The first token of a sequence was written by
no mixture; the last row read writes a token only once it is generated. A
:class:`~xlora.generation.StepRecorder`'s ``per_token`` rows are already in this order (row ``k``
wrote new token ``k``).

**Modules: "layer" means adapted module.** The ``L`` axis holds the adapted modules (180 on a
30-layer model with six projections each). Views name them by module name, group them by decoder
layer in plots (mean over a layer's modules, said in the label), and draw one row when every module
has the same mixture (a head without ``layerwise_scalings``, or rows that are equal).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOKEN_AXIS = "token written (by the mixture at the position before it)"
GENERATED_AXIS = "generated token (by the mixture at the position before it)"
_DECODER_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def token_mixture(scalings: torch.Tensor) -> torch.Tensor:
    """Layer-averaged mixture ``[..., L, E] -> [..., E]`` in float32 (what a per-token view shows)."""
    return scalings.float().mean(-2)


@dataclass
class WrittenTokens:
    """Tokens with the mixture that wrote each: ``ids`` ``[n]`` and ``scalings`` ``[n, L, E]``."""

    ids: list[int]
    scalings: torch.Tensor

    @property
    def mixture(self) -> torch.Tensor:
        """``[n, E]``: each token's layer-averaged mixture."""
        return token_mixture(self.scalings)

    def dominant(self, names: Sequence[str]) -> list[tuple[str, float]]:
        """Per token: the expert with the largest layer-averaged weight, and that weight."""
        return [(names[int(row.argmax())], float(row.max())) for row in self.mixture]

    def pieces(self, tokenizer: object) -> list[str]:
        """The tokens decoded one by one (``tokenizer.decode([id])``)."""
        return [tokenizer.decode([i]) for i in self.ids]  # type: ignore[attr-defined]


def written_by(ids: Sequence[int], rows: torch.Tensor) -> WrittenTokens:
    """Rows in reading order -> the tokens they wrote: row ``t`` (read ``ids[t]``) wrote ``ids[t + 1]``.

    Args:
        ids: the ``N`` tokens of the sequence in order (prompt, then generated).
        rows: ``[T, L, E]`` with ``T <= N``: the scalings applied while reading ``ids[:T]``
            (as :meth:`~xlora.analysis.ScalingsLog.sequence` returns them).

    Returns:
        ``ids[1:T + 1]`` with ``rows[:N - 1]``: ``min(T, N - 1)`` tokens.
    """
    if rows.dim() != 3 or rows.shape[0] > len(ids):
        raise ValueError(f"rows {tuple(rows.shape)} must be [T, L, E] with T <= {len(ids)} tokens")
    n = min(rows.shape[0], len(ids) - 1) if len(ids) else 0
    return WrittenTokens(list(ids[1:n + 1]), rows[:n])


def generated(new_ids: Sequence[int], step_scalings: torch.Tensor) -> WrittenTokens:
    """Generated tokens with the rows of a :meth:`~xlora.generation.StepRecorder.per_token`
    ``[n, L, E]`` (row ``k`` is the last position of the step that chose token ``k``)."""
    if step_scalings.dim() != 3 or step_scalings.shape[0] != len(new_ids):
        raise ValueError(f"step scalings {tuple(step_scalings.shape)} must be [n={len(new_ids)}, L, E]")
    return WrittenTokens(list(new_ids), step_scalings)


# ---------------------------------------------------------------------------------------------- modules
def decoder_layer(module: str) -> int | None:
    """The decoder layer index in a module name (``model.layers.3.self_attn.q_proj`` -> 3), else None."""
    m = _DECODER_LAYER.search(module)
    return int(m.group(1)) if m else None


def short_module_names(names: Sequence[str]) -> list[str]:
    """Module names without their common dotted prefix (``model.layers.0.self_attn.q_proj`` -> ``0.self_attn.q_proj``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def one_mixture(scalings: torch.Tensor) -> bool:
    """Whether every module has the same mixture: ``scalings[..., l, :]`` equal for all ``l``."""
    return scalings.shape[-2] <= 1 or torch.equal(scalings, scalings[..., :1, :].expand_as(scalings))


@dataclass
class ModuleRows:
    """How a plot shows the ``L`` adapted modules: ``labels`` ``[R]``, the module indices of each row,
    and ``kind``, the axis label (it says what a row averages)."""

    labels: list[str]
    groups: list[list[int]]
    kind: str

    def reduce(self, scalings: torch.Tensor) -> torch.Tensor:
        """``[..., L, E] -> [..., R, E]``: the mean over each row's modules."""
        s = scalings.float()
        return torch.stack([s[..., g, :].mean(-2) for g in self.groups], -2)  # [..., R, E]


def module_rows(modules: Sequence[str], scalings: torch.Tensor | None = None,
                shared: bool | None = None) -> ModuleRows:
    """Rows for ``modules``: one row when they share one mixture (``shared``, or equal rows in
    ``scalings [..., L, E]``); else one row per decoder layer (the mean over its modules); else one per
    module (names without their common prefix) when a name has no decoder-layer index."""
    L = len(modules)
    if scalings is not None and scalings.shape[-2] != L:
        raise ValueError(f"scalings {tuple(scalings.shape)} do not fit {L} module names")
    if L and (shared or (shared is None and scalings is not None and one_mixture(scalings))):
        return ModuleRows([f"all {L} modules"], [list(range(L))],
                          f"adapted modules (one mixture for all {L})")
    layers = [decoder_layer(m) for m in modules]
    if L and all(i is not None for i in layers):
        groups: dict[int, list[int]] = {}
        for idx, layer in enumerate(layers):
            groups.setdefault(layer, []).append(idx)  # type: ignore[arg-type]
        sizes = {len(g) for g in groups.values()}
        each = f"its {sizes.pop()} adapted modules" if len(sizes) == 1 else "its adapted modules"
        return ModuleRows([f"layer {i}" for i in groups], list(groups.values()),
                          f"decoder layer (mean over {each})")
    return ModuleRows(short_module_names(modules), [[i] for i in range(L)], "adapted module")
