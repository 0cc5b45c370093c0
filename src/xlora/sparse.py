"""Computing only the experts that count: top-k per token, and coefficients folded into ``A`` once.

All four paths give ``Σ_{chosen e} c_e · B_e · A_e · x`` for a module whose experts are fused as
``A`` ``[R, in]`` and ``B`` ``[out, R]`` (see :class:`~xlora.layers.MixtureLoraLinear`); they differ
only in which work they skip:

- :func:`gathered`: per token, the chosen experts' rows of ``A`` and columns of ``B`` (``k·r_max`` of
  the ``R`` columns) are gathered and multiplied with two batched matmuls. Pays for few tokens
  (decoding) when ``k·r_max`` is a small part of ``R``.
- :func:`grouped`: the (token, expert) pairs are sorted by expert and every chosen expert runs its own
  two matmuls on its tokens only. Pays for many tokens (prefill) when ``k`` is a small part of ``E``.
- :func:`sliced`: few tokens (decoding): each expert some token chose has its rows of ``A`` and columns
  of ``B`` as views (contiguous slices, nothing copied), so it costs two matmuls (and, for several
  tokens, one multiply by each token's scaling of it), whatever ``E``.
- :func:`fold`: with scalings fixed per sequence (prompt granularity) the coefficients are folded into
  ``A`` once, ``A' = diag(c)·A`` per sequence, keeping only the columns with ``c ≠ 0``; each decoding
  step is then two plain matmuls with no scaling op. :class:`SharedFold` does it for scalings fixed by
  hand for every sequence and token (``[L, E]``: the base, one expert, the uniform mix), so such a pass
  computes only the experts it weights (none for the base).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FoldedExperts:
    """One module's experts with one fixed coefficient vector per sequence folded in.

    ``delta(x)[b] = (x[b] · A[b]ᵀ) · B[b]ᵀ`` where ``A`` is ``[b, R', in]`` (``diag(c_b)·A`` restricted to
    the columns kept, rows of zeros where a sequence has fewer than ``R'``) and ``B`` is ``[out, R']``
    (shared: every column kept) or ``[b, out, R']`` (each sequence's own columns). A 2-D ``A`` ``[R', in]``
    (with ``B`` ``[out, R']``) is one coefficient vector shared by every sequence of any batch.
    """

    A: torch.Tensor
    B: torch.Tensor

    def rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FoldedExperts:
        """The same op on the batch axis of every per-sequence tensor (beam reorder, repeat, select)."""
        if self.A.dim() == 2:  # shared by every sequence: no batch axis
            return self
        return FoldedExperts(fn(self.A), fn(self.B) if self.B.dim() == 3 else self.B)


def fold(A: torch.Tensor, B: torch.Tensor, coef: torch.Tensor) -> FoldedExperts | None:
    """Fold per-sequence column coefficients ``coef`` ``[b, R]`` into ``A`` ``[R, in]``; ``None`` if all are 0."""
    nz = coef != 0  # [b, R]
    kept = int(nz.sum(1).max())
    if kept == 0:
        return None
    if kept == A.shape[0]:  # some sequence uses every column: keep them all and share B
        return FoldedExperts(coef.unsqueeze(-1) * A, B)  # [b, R, in]
    # each sequence's nonzero columns first (stable: in column order), the first `kept` of them
    idx = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :kept]  # [b, R']
    c = coef.gather(1, idx)  # [b, R'] zero on a sequence's padding columns
    return FoldedExperts(c.unsqueeze(-1) * A[idx], B[:, idx].permute(1, 0, 2).contiguous())  # [b,R',in], [b,out,R']


def folded_down(x: torch.Tensor, f: FoldedExperts) -> torch.Tensor:
    """``x · A'ᵀ`` per sequence: ``x`` ``[b, t, in]`` -> ``[b, t, R']``."""
    if f.A.dim() == 2:  # shared by every sequence
        return F.linear(x, f.A)
    if x.dim() != 3 or x.shape[0] != f.A.shape[0]:
        raise ValueError(f"folded experts hold {f.A.shape[0]} sequences but the input has shape {tuple(x.shape)}: "
                         "the cache's rows and the batch differ")
    if x.shape[0] == 1:
        return F.linear(x, f.A[0])
    return torch.bmm(x, f.A.transpose(1, 2))


class SharedFold:
    """Scalings fixed by hand for every sequence and token, ``s`` ``[L, E]``, folded into every module's ``A``
    (:func:`fold` with one coefficient vector, kept 2-D): ``A'_l = diag(c_l)·A_l`` over the columns with
    ``c ≠ 0``. The base (``s = 0``) then runs no expert matmul, one expert alone its ``r`` columns of ``R``,
    and no pass multiplies by coefficients.

    :meth:`get` keeps the last fold for the tensor it was asked to keep (a ``fixed_scalings`` context's own
    copy, which nobody else can change), so decoding steps fold once; :meth:`clear` drops it.
    """

    def __init__(self) -> None:
        self._key: tuple[torch.Tensor, float] | None = None
        self._folded: tuple[FoldedExperts | None, ...] | None = None

    def get(self, s: torch.Tensor, global_weight: float, layers: Callable[[], list], keep: bool
            ) -> tuple[FoldedExperts | None, ...] | None:
        """Per layer of ``layers()`` (:class:`~xlora.layers.MixtureLoraLinear`), ``s`` folded (``None``: all 0);
        ``None`` instead of the tuple when ``s`` weights every expert everywhere (nothing to skip: the dense
        path, measured as fast)."""
        if keep and self._key is not None and self._key[0] is s and self._key[1] == global_weight:
            return self._folded
        folded = None if bool((s != 0).all()) else \
            tuple(_shared(layer.fold(s.unsqueeze(0), global_weight)) for layer in layers())
        if keep:
            self._key, self._folded = (s, global_weight), folded
        return folded

    def clear(self) -> None:
        self._key, self._folded = None, None


def _shared(f: FoldedExperts | None) -> FoldedExperts | None:
    """A one-sequence fold as the 2-D form that serves any batch."""
    return None if f is None else FoldedExperts(f.A[0], f.B[0] if f.B.dim() == 3 else f.B)


def gathered(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cols: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, in]``, per token ``K`` column indices ``cols`` ``[n, K]`` and coefficients ``coef``
    ``[n, K]`` -> ``[n, out]``: ``Σ_j coef[i, j] · B[:, cols[i, j]] · (A[cols[i, j]] · x[i])``."""
    n, K = cols.shape
    flat = cols.reshape(-1)  # index_select: several times faster than advanced indexing for these sizes
    a = A.index_select(0, flat).view(n, K, A.shape[1])  # [n, K, in]
    b = B.index_select(1, flat).view(B.shape[0], n, K)  # [out, n, K]
    h = torch.bmm(a, x.unsqueeze(-1)).squeeze(-1) * coef  # [n, K]
    if n == 1:
        return F.linear(h, b[:, 0])  # [1, out]
    return torch.bmm(h.unsqueeze(1), b.permute(1, 2, 0)).squeeze(1)  # [n, out]


def choices_by_layer(values: torch.Tensor, experts: torch.Tensor, num_experts: int
                     ) -> list[list[tuple[float | torch.Tensor, int]]]:
    """The top-k choice ``values``, ``experts`` ``[b, t, L, k]`` of ``n = b·t`` tokens -> per layer, ``(s, e)``
    for each expert ``e`` some token chose (one read from the device for all layers). One token: ``s`` its
    scaling, a Python number; several: ``s`` ``[n, 1]``, each token's scaling of ``e`` (0 where it did not
    choose ``e``), a view of one ``[L, E, n, 1]`` tensor."""
    b, t, L, k = values.shape
    if b * t == 1:
        return [list(zip(v, e)) for v, e in zip(values[0, 0].tolist(), experts[0, 0].tolist())]
    n = b * t
    s = values.new_zeros(n, L, num_experts).scatter_(-1, experts.reshape(n, L, k), values.reshape(n, L, k))
    used, cols = (s != 0).any(0).tolist(), s.permute(1, 2, 0).unsqueeze(-1).contiguous()  # [L][E], [L, E, n, 1]
    return [[(cols[l, e], e) for e in range(num_experts) if used[l][e]] for l in range(L)]


def sliced(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
           chosen: list[tuple[float | torch.Tensor, int]], spans: dict[int, tuple[int, int, float]],
           weight: float) -> torch.Tensor:
    """Few tokens: ``x`` ``[n, in]`` (the experts' dtype), ``y`` ``[n, out]`` (the base output), the chosen
    ``(s, e)`` pairs of :func:`choices_by_layer` (``s`` a number for one token, ``[n, 1]`` for several) and
    ``spans[e] = (c0, c1, α/r)`` for the experts with columns here ->
    ``y + Σ_e weight·α/r · (s ⊙ (x · A[c0:c1]ᵀ)) · B[:, c0:c1]ᵀ``: per chosen expert one ``linear``, one
    ``addmm`` (and for several tokens one multiply), on views of ``A`` and ``B`` (nothing gathered)."""
    fused = y.dtype == A.dtype
    delta = y if fused else None
    for s, e in chosen:
        per_token = isinstance(s, torch.Tensor)
        if e not in spans or (not per_token and s == 0):
            continue
        c0, c1, scale = spans[e]
        h, c = F.linear(x, A[c0:c1]), scale * weight  # h: [n, r]
        if per_token:
            h.mul_(s.to(h.dtype))  # each token's scaling of e; h is fresh from the linear, so in place
        else:
            c *= s
        if not fused:  # experts in another dtype than the output (fp16 on a float32 base): scale h before B,
            h, c = h * c, 1.0  # as the dense path does, so that h·Bᵀ cannot overflow before it is scaled
        delta = F.linear(h, B[:, c0:c1]) if delta is None else torch.addmm(delta, h, B[:, c0:c1].t(), alpha=c)
    if fused or delta is None:
        return y if delta is None else delta
    return y + delta.to(y.dtype)


def grouped(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, local: torch.Tensor, weight: torch.Tensor,
            spans: list[tuple[int, int]]) -> torch.Tensor:
    """``x`` ``[n, in]``, per token ``k`` local expert indices ``local`` ``[n, k]`` (``len(spans)`` = none)
    and their coefficients ``weight`` ``[n, k]`` (``g·s·α/r``) -> ``[n, out]``; expert ``e`` owns
    columns ``spans[e] = (start, stop)``. Each chosen expert multiplies only its own tokens."""
    n, k = local.shape
    flat = local.reshape(-1)  # [n·k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(spans) + 1).tolist()
    token = order // k  # [n·k] the token of each sorted pair
    xs, ws = x[token], weight.reshape(-1)[order]
    parts, start = [], 0
    for (c0, c1), count in zip(spans, counts):
        if count:
            seg = slice(start, start + count)
            h = F.linear(xs[seg], A[c0:c1]) * ws[seg].unsqueeze(-1)  # [count, r_e]
            parts.append(F.linear(h, B[:, c0:c1]))  # [count, out]
        start += count
    out = x.new_zeros(n, B.shape[0])
    if not parts:
        return out
    return out.index_add(0, token[:start], torch.cat(parts))
