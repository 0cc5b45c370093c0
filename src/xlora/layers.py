"""The fused mixture-of-LoRA layer and the state object through which scalings reach it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from xlora import sparse
from xlora.adapters import LoraModuleWeights, module_features


class ScalingState:
    """The one explicit channel from the model to its layers (no hooks, no patched ``forward``).

    Exactly one of ``scalings`` (``[b, t, L, E]``) and ``constant`` (one value for every token,
    layer and expert) is in force during a pass; with neither, or ``constant == 0``, the layers are
    the base model and skip the expert matmuls.

    ``top_k``: the scalings have at most ``k`` nonzero experts per token and layer (they come from a
    top-k head), so layers may compute only those (:meth:`chosen`). ``folded``: per layer, the
    experts with fixed per-sequence coefficients folded in (prompt granularity's decoding steps with a top-k head;
    ``None`` for a layer without any), which then replace ``scalings``.
    """

    def __init__(self) -> None:
        self.scalings: torch.Tensor | None = None
        self.constant: float | None = None
        self.global_weight: float = 1.0
        # optional per-column coefficients [b, t, L, R_max] (ColumnTable): one gather per pass for all layers
        self.coefficients: torch.Tensor | None = None
        self.top_k: int | None = None
        self.folded: tuple[sparse.FoldedExperts | None, ...] | None = None
        self._chosen: tuple[torch.Tensor, torch.Tensor] | None = None
        self._chosen_slices: list[list[tuple[float | torch.Tensor, int]]] | None = None

    @contextmanager
    def use(
        self, *, scalings: torch.Tensor | None = None, constant: float | None = None, global_weight: float = 1.0,
        coefficients: torch.Tensor | None = None, top_k: int | None = None,
        folded: tuple[sparse.FoldedExperts | None, ...] | None = None,
    ) -> Iterator[None]:
        saved = dict(vars(self))
        self.scalings, self.constant, self.global_weight = scalings, constant, global_weight
        self.coefficients, self.top_k, self.folded = coefficients, top_k, folded
        self._chosen = self._chosen_slices = None
        try:
            yield
        finally:
            vars(self).update(saved)

    def chosen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, experts)``, both ``[b, t, L, k]``: the ``top_k`` largest ``|s|`` per token and layer
        (every nonzero scaling among them), computed once per pass for all layers."""
        if self._chosen is None:
            experts = self.scalings.abs().topk(self.top_k, dim=-1).indices  # [b, t, L, k]
            self._chosen = (self.scalings.gather(-1, experts), experts)
        return self._chosen

    def chosen_slices(self) -> list[list[tuple[float | torch.Tensor, int]]]:
        """For a pass over few tokens: :func:`sparse.choices_by_layer` of :meth:`chosen`, once for all layers."""
        if self._chosen_slices is None:
            self._chosen_slices = sparse.choices_by_layer(*self.chosen(), self.scalings.shape[-1])
        return self._chosen_slices

    def checkpoint_contexts(self) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recomputation in the
        backward pass runs with the state in force when the layer first ran, not the state of the
        moment (by then the pass that set it has ended)."""
        snapshot = {"scalings": self.scalings, "constant": self.constant, "global_weight": self.global_weight,
                    "coefficients": self.coefficients, "top_k": self.top_k, "folded": self.folded}
        return nullcontext(), self.use(**snapshot)


class ColumnTable(nn.Module):
    """For all ``L`` layers at once: which expert each intermediate column belongs to, and its ``α/r``.

    ``coefficients(s, g)[b, t, l, j] = g · s[b, t, l, expert[l, j]] · scale[l, j]`` for ``j < R_l``
    (zero-padded to ``R_max``); layer ``l`` reads the view ``[..., l, :R_l]``.

    The table saves a few small ops per layer, which pays when ``b·t`` is small (decoding). For
    large inputs it is ``b·t·L·R_max`` numbers written once and read strided by every layer; when
    every layer has experts of one rank, layers then weight ``h`` viewed as ``[b, t, E, r]`` instead
    (bit-identical, 3-7% faster at 4×256 tokens) and :meth:`coefficients` returns ``None``.
    """

    MAX_TABLE = 1 << 20  # entries; above it (and with uniform ranks) the layers go without the table

    def __init__(self, layers: list[MixtureLoraLinear]) -> None:
        super().__init__()
        r_max = max(layer.lora_A.shape[0] for layer in layers)
        expert = torch.zeros(len(layers), r_max, dtype=torch.long)
        scale = torch.zeros(len(layers), r_max, dtype=torch.float64)  # cast to the layers' dtype below
        for l, layer in enumerate(layers):
            r = layer.lora_A.shape[0]
            expert[l, :r] = layer.col_expert.cpu()
            scale[l, :r] = layer.col_scale.double().cpu()
        device, dtype = layers[0].col_scale.device, layers[0].col_scale.dtype
        self.register_buffer("expert", expert.to(device), persistent=False)
        self.register_buffer("scale", scale.to(device, dtype), persistent=False)
        self.uniform_ranks = all(layer.uniform_rank for layer in layers)

    def coefficients(self, s: torch.Tensor, global_weight: float) -> tuple[torch.Tensor, ...] | None:
        b, t, L, _ = s.shape
        if self.uniform_ranks and b * t * L * self.expert.shape[1] > self.MAX_TABLE:
            return None
        idx = self.expert.expand(b, t, L, self.expert.shape[1])  # [b, t, L, R_max]
        table = torch.gather(s.to(self.scale.dtype), -1, idx) * (self.scale * global_weight)
        return table.unbind(2)  # L views [b, t, R_max], one per layer, made by one op


class MixtureLoraLinear(nn.Module):
    """A frozen base ``Linear``/``Conv1D`` plus all experts that adapt it, fused.

    For input ``x`` of shape ``[b, t, in]`` and scalings ``s`` of shape ``[b, t, L, E]``:

        y = base(x) + g · Σ_e s[b, t, l, e] · (α_e / r_e) · B_e · A_e · drop(x)

    computed as two matmuls whatever the number of experts: with ``A = [A_1; …; A_E]`` of shape
    ``[R, in]`` and ``B = [B_1 … B_E]`` of shape ``[out, R]`` (``R = Σ r_e``),

        h = drop(x) · Aᵀ                  # [b, t, R]
        y = base(x) + (h ⊙ c) · Bᵀ        # c[b, t, j] = g · s[b, t, l, e(j)] · α_e / r_e

    Experts that do not adapt this module have no columns here and contribute nothing.

    Args:
        base_layer: the module being adapted; it is called, never copied.
        layer_index: ``l``, this module's index on the ``L`` axis of the scalings.
        num_experts: ``E`` of the whole model.
        experts: ``{expert index: weights}`` of the experts that adapt this module.
        state: the shared :class:`ScalingState`.
        trainable: whether ``A`` and ``B`` receive gradients.
        dtype: the experts' own dtype (default: the base layer's floating weight dtype, else float32).
            The base layer computes itself, quantised or not (bitsandbytes ``Linear8bitLt`` /
            ``Linear4bit``, torchao weight tensors); ``x`` is cast to ``dtype`` for the experts and
            their sum cast back to the base output's dtype.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layer_index: int,
        num_experts: int,
        experts: dict[int, LoraModuleWeights],
        state: ScalingState,
        trainable: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.state = state
        self.in_features, self.out_features = module_features(base_layer)
        w = next(base_layer.parameters())
        ids = sorted(experts)
        self.expert_ranks = [experts[e].rank for e in ids]
        device = w.device
        dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
        self.lora_A = nn.Parameter(torch.cat([experts[e].A for e in ids]).to(device, dtype), requires_grad=trainable)
        self.lora_B = nn.Parameter(torch.cat([experts[e].B for e in ids], 1).to(device, dtype), requires_grad=trainable)
        # Column j of the intermediate belongs to expert col_expert[j] and is scaled by α/r of it.
        col_expert = torch.repeat_interleave(torch.tensor(ids), torch.tensor(self.expert_ranks))
        # float64 so that a float64 base layer gets α/r unrounded (a float32 tensor would round it)
        col_scale = torch.repeat_interleave(
            torch.tensor([experts[e].scale for e in ids], dtype=torch.float64), torch.tensor(self.expert_ranks)
        )
        col_drop = torch.repeat_interleave(torch.tensor([experts[e].dropout for e in ids]), torch.tensor(self.expert_ranks))
        self.register_buffer("col_expert", col_expert.to(device), persistent=False)
        self.register_buffer("col_scale", col_scale.to(device, dtype), persistent=False)
        self.expert_ids = ids
        self.all_experts = ids == list(range(num_experts))
        self.uniform_rank = len(set(self.expert_ranks)) == 1
        # α/r per expert of this module, for the uniform-rank path of forward
        self.register_buffer("expert_scale", col_scale[torch.tensor(self.expert_ranks).cumsum(0) - 1].to(device, dtype),
                             persistent=False)
        # Distinct dropout probabilities -> boolean column masks (one matmul per distinct p in training).
        self._dropout_groups = [(float(p), col_drop == p) for p in torch.unique(col_drop).tolist()]
        self._no_dropout = all(p == 0.0 for p, _ in self._dropout_groups)
        self._init_sparse(num_experts, col_scale)

    # Sparse top-k: <= SLICE_TOKENS tokens slice the chosen experts' A, B (one token: whatever E; more: when the
    # experts they chose are <= E_l/UNION_SHARE); more tokens gather (chosen columns <= R/GATHER_SHARE) or group
    # by expert (chosen experts <= E_l/GROUP_SHARE and tokens >= E_l); else dense.
    GATHER_SHARE, GROUP_SHARE, SLICE_TOKENS, UNION_SHARE = 16, 4, 8, 8

    def _init_sparse(self, num_experts: int, col_scale: torch.Tensor) -> None:
        """Tables from a global expert index to this module's columns (local index ``E_l`` = not here)."""
        E_l, r_max, device = len(self.expert_ids), max(self.expert_ranks), self.lora_A.device
        local_of = torch.full((num_experts,), E_l, dtype=torch.long)
        local_of[torch.tensor(self.expert_ids)] = torch.arange(E_l)
        cols = torch.zeros(E_l + 1, r_max, dtype=torch.long)  # padding points at column 0, scaled by 0
        colscale = torch.zeros(E_l + 1, r_max, dtype=torch.float64)
        starts = [0, *torch.tensor(self.expert_ranks).cumsum(0).tolist()]
        self._spans = list(zip(starts[:-1], starts[1:]))
        self._span_of = {g: (c0, c1, float(col_scale[c0])) for g, (c0, c1) in zip(self.expert_ids, self._spans)}
        for e, (c0, c1) in enumerate(self._spans):
            cols[e, : c1 - c0] = torch.arange(c0, c1)
            colscale[e, : c1 - c0] = col_scale[c0:c1]
        dtype = self.lora_A.dtype
        self.register_buffer("local_of", local_of.to(device), persistent=False)
        self.register_buffer("expert_cols", cols.to(device), persistent=False)
        self.register_buffer("expert_colscale", colscale.to(device, dtype), persistent=False)
        self.register_buffer("expert_scale_or_0", colscale[:, 0].to(device, dtype), persistent=False)

    def _sliced(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Top-k scalings, few tokens (``b·t <= SLICE_TOKENS``), no gradient to the scalings: ``y`` plus the
        chosen experts' sum by :func:`sparse.sliced`; else ``None``."""
        state, n = self.state, x.numel() // x.shape[-1]
        if (state.top_k is None or state.scalings is None or n > self.SLICE_TOKENS
                or state.scalings.shape[:2].numel() != n or (self.training and not self._no_dropout)
                or (torch.is_grad_enabled() and state.scalings.requires_grad)):
            return None
        chosen = state.chosen_slices()[self.layer_index]
        if n > 1 and sum(e in self._span_of for _, e in chosen) * self.UNION_SHARE > len(self.expert_ids):
            return None
        out = sparse.sliced(self._cast(x).reshape(n, -1), y.reshape(n, -1), self.lora_A, self.lora_B, chosen,
                            self._span_of, state.global_weight)
        return out.view(y.shape)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor | None:
        """With top-k scalings, ``g·Σ_{chosen e} s_e·α_e/r_e·B_e·A_e·x`` ``[..., out]`` computed for the
        chosen experts only (:func:`sparse.gathered` or :func:`sparse.grouped`), or ``None`` where the
        dense path is cheaper (few experts, or dropout in training)."""
        state, k = self.state, self.state.top_k
        if k is None or state.scalings is None or (self.training and not self._no_dropout):
            return None
        n, R = x.numel() // x.shape[-1], self.lora_A.shape[0]
        gather = n * k * self.expert_cols.shape[1] * self.GATHER_SHARE <= R
        if not gather and (k * self.GROUP_SHARE > len(self.expert_ids) or n < len(self.expert_ids)):
            return None
        values, experts = state.chosen()
        values = values[..., self.layer_index, :].reshape(n, k).to(self.lora_A.dtype)  # [n, k]
        local = self.local_of.index_select(0, experts[..., self.layer_index, :].reshape(-1)).view(n, k)  # [n, k]
        x2 = self._cast(x).reshape(n, x.shape[-1])
        if gather:
            flat = local.reshape(-1)
            cols = self.expert_cols.index_select(0, flat).view(n, -1)  # [n, k·r_max]
            scale = self.expert_colscale.index_select(0, flat).view(n, k, -1)  # [n, k, r_max]
            coef = (values.unsqueeze(-1) * (scale * state.global_weight)).reshape(n, -1)
            out = sparse.gathered(x2, self.lora_A, self.lora_B, cols, coef)
        else:
            weight = values * (self.expert_scale_or_0[local] * state.global_weight)  # [n, k]
            out = sparse.grouped(x2, self.lora_A, self.lora_B, local, weight, self._spans)
        return out.view(*x.shape[:-1], out.shape[-1])

    def fold(self, s: torch.Tensor, global_weight: float) -> sparse.FoldedExperts | None:
        """This module's experts with fixed per-sequence scalings ``s`` ``[b, L, E]`` folded into ``A``
        (see :func:`sparse.fold`); ``None`` when all of them are 0."""
        with torch.no_grad():
            coef = self._column_coefficients(s.unsqueeze(1), global_weight)[:, 0]  # [b, R]
            return sparse.fold(self.lora_A, self.lora_B, coef.to(self.lora_A.dtype))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """``h = drop(x) · Aᵀ`` with each expert's own dropout probability, in the experts' dtype; ``[..., R]``."""
        x = self._cast(x)
        if self._no_dropout or not self.training:
            return F.linear(x, self.lora_A)
        if len(self._dropout_groups) == 1:
            return F.linear(F.dropout(x, self._dropout_groups[0][0], True), self.lora_A)
        h = None
        for p, mask in self._dropout_groups:
            part = F.linear(F.dropout(x, p, True), self.lora_A) * mask.to(x.dtype)
            h = part if h is None else h + part
        return h

    def _column_coefficients(self, s: torch.Tensor, global_weight: float) -> torch.Tensor:
        """Per-token coefficients ``c`` of the ``R`` intermediate columns from ``s`` of shape ``[b, t, L, E]``."""
        s = s[..., self.layer_index, :]  # [b, t, E]
        if not self.all_experts:
            s = s[..., self.expert_ids]  # [b, t, E_l]
        if self.uniform_rank:
            r = self.expert_ranks[0]
            s = s.unsqueeze(-1).expand(*s.shape, r).reshape(*s.shape[:-1], -1)  # [b, t, R]
        else:
            s = s.repeat_interleave(torch.tensor(self.expert_ranks, device=s.device), dim=-1)  # [b, t, R]
        return s.to(self.col_scale.dtype) * (self.col_scale * global_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, s = self.base_layer(x), self.state.scalings
        if s is not None and x.dim() == 3 and s.shape[1] not in (1, x.shape[1]):  # one token's scalings broadcast
            raise ValueError(f"{self.extra_repr()}: input of {x.shape[1]} tokens under scalings for {s.shape[1]}: "
                             "pass scalings for the input's tokens (or one token's, applied to all of them)")
        if self.state.folded is not None:  # fixed per-sequence coefficients already in A: two plain matmuls
            folded = self.state.folded[self.layer_index]
            if folded is None:
                return y
            h, B = sparse.folded_down(self._cast(x), folded), folded.B  # [b, t, R']
            B = B[0] if B.dim() == 3 and B.shape[0] == 1 else B
        else:
            out = self._sliced(x, y)
            if out is not None:
                return out
            delta = self._sparse(x)
            if delta is not None:
                return y + delta.to(y.dtype)
            h, B = self._weighted(x), self.lora_B  # [..., R]
            if h is None:
                return y
        if B.dim() == 3:  # each sequence its own columns: [b, t, R'] x [b, R', out]
            if h.dtype == y.dtype:
                return torch.baddbmm(y, h, B.transpose(1, 2))
            return y + torch.bmm(h, B.transpose(1, 2)).to(y.dtype)
        if h.dtype == y.dtype:  # y + h·Bᵀ as one fused multiply-add (fewer kernels per module when decoding)
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t())
            return out.view(y.shape)
        return y + F.linear(h, B).to(y.dtype)

    def _weighted(self, x: torch.Tensor) -> torch.Tensor | None:
        """``c ⊙ (drop(x) · Aᵀ)``, ``[..., R]`` in the experts' dtype (``c = g·s·α/r`` per column), or
        ``None`` when every scaling is 0."""
        state = self.state
        if state.coefficients is not None:
            coef = state.coefficients[self.layer_index]  # [b, t, R_max]
            if coef.shape[-1] != self.lora_A.shape[0]:
                coef = coef[..., : self.lora_A.shape[0]]
            return self._down(x) * coef
        if state.scalings is not None and self.uniform_rank:
            # h viewed as [b, t, E_l, r]: each expert's r columns times g·s·α/r, no [b, t, R] coefficients
            s = state.scalings[..., self.layer_index, :]
            if not self.all_experts:
                s = s[..., self.expert_ids]
            w = s.to(self.expert_scale.dtype) * (self.expert_scale * state.global_weight)  # [b, t, E_l]
            h = self._down(x)
            return (h.unflatten(-1, (len(self.expert_ids), self.expert_ranks[0])) * w.unsqueeze(-1)).flatten(-2)
        if state.scalings is not None:
            coef = self._column_coefficients(state.scalings, state.global_weight)
        elif state.constant:
            coef = self.col_scale * (state.constant * state.global_weight)  # [R]
        else:
            return None  # scalings all zero: exactly the base layer, no expert matmuls
        return self._down(x) * coef.to(self.lora_A.dtype)

    def expert_weights(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{expert index: (A [r, in], B [out, r])}``, split back out of the fused matrices."""
        out, start = {}, 0
        for e, r in zip(self.expert_ids, self.expert_ranks):
            out[e] = (self.lora_A[start:start + r].detach(), self.lora_B[:, start:start + r].detach())
            start += r
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, layer_index={self.layer_index}, "
                f"experts={self.expert_ids}, ranks={self.expert_ranks}")
