"""`XLoraModel`: expert layers injected into a frozen causal LM, the two-pass forward, save/load."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from xlora.adapters import LoraExpert, adaptable_modules, load_experts
from xlora.bases import check_scaling_pass_layers, first_layers, float_dtype, hidden_size
from xlora.config import XLoraConfig
from xlora.generation import ScalingsObserver, XLoraGenerationMixin
from xlora.head import PrefixMeans, ScalingHead, head_input
from xlora.layers import ColumnTable, MixtureLoraLinear, ScalingState
from xlora.lifecycle import LifecycleMixin
from xlora.saving import load_model, save_model, save_trainer_weights
from xlora.sparse import SharedFold

ScalingsSpec = str | int | torch.Tensor | None


@dataclass
class XLoraOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``scalings`` of shape ``[b, t, L, E]`` (after softmax / top-k)."""

    scalings: torch.Tensor | None = None


class XLoraModel(LifecycleMixin, XLoraGenerationMixin, PreTrainedModel):
    """A mixture of LoRA experts over a Hugging Face causal LM.

    One forward is two passes of the same base model: a scaling pass (no grad, every scaling set
    to ``scaling_pass_value``) whose last hidden state ``[b, t, hidden]`` feeds the scaling head,
    giving scalings ``s`` of shape ``[b, t, L, E]``; then the main pass with ``s`` in every
    adapted module, which yields the logits and, with ``labels``, the loss.

    It is a ``PreTrainedModel`` so that Hugging Face's ``Trainer`` saves it through
    :meth:`save_pretrained` (the X-LoRA, never a copy of the frozen base, which may have tied
    weights) and resumes it from its checkpoints (see :meth:`save_pretrained`).

    Args:
        base_model: a ``PreTrainedModel`` for causal LM; it is adapted in place (its ``Linear`` /
            ``Conv1D`` targets are wrapped, never copied) and frozen.
        config: the X-LoRA configuration; ``hidden_size`` and ``num_adapted_modules`` are filled
            in from the base model (a conflicting value is an error).
        experts_root: folder against which relative expert paths are resolved.
    """

    # PreTrainedModel.__init__ checks the attention implementation against these, on a copy of the
    # base's config: the base's own choice stands, whatever it is.
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, base_model: PreTrainedModel, config: XLoraConfig, experts_root: str | Path | None = None) -> None:
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}")
        super().__init__(copy.deepcopy(base_model.config))
        config = XLoraConfig.from_dict(config.to_dict())  # ours to fill in; the caller's object is left as it is
        hidden = hidden_size(base_model)
        if config.hidden_size is not None and config.hidden_size != hidden:
            raise ValueError(
                f"config.hidden_size={config.hidden_size} but the base model's hidden size is {hidden}: "
                "this X-LoRA head was trained for another base model"
            )
        check_scaling_pass_layers(config.scaling_pass_layers, base_model)
        experts = load_experts(config.experts, base_model, Path(experts_root) if experts_root else None)
        self._base_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        self._base_was_checkpointing = base_model.is_activation_checkpointing
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.base_model = base_model
        self.xlora_config = config
        self.config = base_model.config  # the Hugging Face convention: model.config is the base model's
        self.generation_config = base_model.generation_config
        self.state = ScalingState()
        self.adapted_modules = self._inject(experts)
        self.columns = ColumnTable(self.mixture_layers())
        self._output_adapted = isinstance(base_model.get_output_embeddings(), MixtureLoraLinear)
        # The fused layers now own the weights; keep only each expert's name, path and config.
        self.experts: list[LoraExpert] = [dataclasses.replace(e, modules={}) for e in experts]
        L = len(self.adapted_modules)
        if config.num_adapted_modules is not None and config.num_adapted_modules != L:
            raise ValueError(
                f"config.num_adapted_modules={config.num_adapted_modules} but the experts adapt {L} modules "
                "of this base model: the head was trained with other experts or another base model"
            )
        config.hidden_size, config.num_adapted_modules = hidden, L
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model.config, "_name_or_path", None) or None
        w = base_model.get_input_embeddings().weight
        self.head = ScalingHead(config, hidden, L, config.num_experts).to(w.device, float_dtype(base_model))
        self._fixed_scalings: torch.Tensor | None = None  # set only inside `with fixed_scalings(...)`
        self._shared_fold = SharedFold()
        self.train(base_model.training)

    @property
    def base_model(self) -> PreTrainedModel:
        """The adapted causal LM (``PreTrainedModel.base_model`` would name its decoder)."""
        return self._modules["base_model"]

    # ------------------------------------------------------------------ construction
    def _inject(self, experts: list[LoraExpert]) -> list[str]:
        """Wrap every module that at least one expert adapts; returns their names (the ``L`` axis)."""
        targets = adaptable_modules(self.base_model)
        names = [n for n in targets if any(n in e.modules for e in experts)]
        cfg = self.xlora_config.lora_dtype
        lora_dtype = getattr(torch, cfg) if cfg else float_dtype(self.base_model)
        for l, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            per_expert = {i: e.modules[name] for i, e in enumerate(experts) if name in e.modules}
            layer = MixtureLoraLinear(targets[name], l, len(experts), per_expert, self.state,
                                      trainable=self.xlora_config.use_trainable_adapters, dtype=lora_dtype)
            setattr(parent, child, layer)
        return names

    def mixture_layers(self) -> list[MixtureLoraLinear]:
        return [self.base_model.get_submodule(n) for n in self.adapted_modules]

    @property
    def num_experts(self) -> int:
        return self.xlora_config.num_experts

    @property
    def num_layers(self) -> int:
        """``L``: the number of adapted modules, the layer axis of the scalings."""
        return len(self.adapted_modules)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    # ------------------------------------------------------------------ scalings
    def resolve_scalings(self, spec: ScalingsSpec) -> torch.Tensor | None:
        """Turn a hand-fixed scalings spec into a tensor that broadcasts to ``[b, t, L, E]``.

        ``spec`` is ``None`` (use the head), ``"uniform"`` (``1/E`` each), ``"zero"`` (the base model),
        an expert name or index (that expert alone at 1), or a tensor of shape ``[E]``, ``[L, E]``,
        ``[b, L, E]`` (each sequence its own mixture at every position, also while generating) or
        ``[b, t, L, E]``.
        """
        L, E = self.num_layers, self.num_experts
        if spec is None:
            return None
        if isinstance(spec, str) and spec in ("uniform", "zero"):
            return torch.full((L, E), 1.0 / E if spec == "uniform" else 0.0, device=self.device, dtype=self.dtype)
        if isinstance(spec, (str, int)) and not isinstance(spec, bool):
            names = self.xlora_config.expert_names
            if isinstance(spec, str):
                if spec not in names:
                    raise ValueError(f"scalings={spec!r} names no expert; choose one of {names}, 'uniform' or 'zero'")
                idx = names.index(spec)
            else:
                if not 0 <= spec < E:
                    raise ValueError(f"scalings={spec} is not an expert index; use 0..{E - 1}")
                idx = spec
            s = torch.zeros(L, E, device=self.device, dtype=self.dtype)
            s[:, idx] = 1.0
            return s
        if isinstance(spec, torch.Tensor):
            if spec.shape[-1] != E or spec.dim() not in (1, 2, 3, 4) or (spec.dim() >= 2 and spec.shape[-2] != L):
                raise ValueError(
                    f"scalings tensor has shape {tuple(spec.shape)}; expected [E]=[{E}], [L, E]=[{L}, {E}], "
                    f"[batch, {L}, {E}] or [batch, seq, {L}, {E}]"
                )
            return (spec.expand(L, E) if spec.dim() == 1 else spec).to(self.device, self.dtype)
        raise ValueError(f"scalings must be None, 'uniform', 'zero', an expert name/index or a tensor, got {spec!r}")

    @contextmanager
    def fixed_scalings(self, spec: ScalingsSpec) -> Iterator[None]:
        """Inside ``with model.fixed_scalings("chem"): ...`` every forward (and ``generate``) uses the
        scalings ``spec`` (see :meth:`resolve_scalings`) instead of the scaling pass and head; the
        per-call form is ``model(..., scalings="chem")``."""
        saved = self._fixed_scalings
        fixed = self.resolve_scalings(spec)  # a copy of its own: the fold kept for it cannot go stale
        self._fixed_scalings = fixed.clone() if fixed is not None and fixed.dim() <= 2 else fixed
        try:
            yield
        finally:
            self._fixed_scalings = saved
            self._shared_fold.clear()

    def _fixed_experts(self, fixed: torch.Tensor, b: int, t: int, g: float) -> tuple[torch.Tensor, tuple | None]:
        """Hand-fixed scalings expanded to ``[b, t, L, E]`` (no scaling pass: its cache falls behind, checked on
        reuse) and, for ``[L, E]`` scalings at inference, their fold into ``A`` (:class:`~xlora.sparse.SharedFold`)."""
        s = self._expand_fixed(fixed, b, t)
        if fixed.dim() > 2 or torch.is_grad_enabled() or self.training:
            return s, None
        return s, self._shared_fold.get(fixed, g, self.mixture_layers, keep=fixed is self._fixed_scalings)

    def _expand_fixed(self, fixed: torch.Tensor, b: int, t: int) -> torch.Tensor:
        if fixed.dim() == 4:
            if fixed.shape[0] != b or fixed.shape[1] != t:
                raise ValueError(f"fixed scalings of shape {tuple(fixed.shape)} do not match the input's batch {b} x "
                                 f"length {t}: give [{b}, {t}, L, E] (one mixture per token), or [{b}, L, E] for one "
                                 "mixture per sequence")
            return fixed
        if fixed.dim() == 3:  # [b, L, E]: one mixture per sequence, at every position
            if fixed.shape[0] != b:
                raise ValueError(f"per-sequence fixed scalings of shape {tuple(fixed.shape)} do not match the input's "
                                 f"batch {b}; with num_beams or num_return_sequences k > 1 give one row per generated "
                                 "sequence (scalings.repeat_interleave(k, 0))")
            return fixed.unsqueeze(1).expand(b, t, -1, -1)
        return fixed.expand(b, t, *fixed.shape)

    def scaling_pass(self, layers: int | None = None, **inputs: Any) -> torch.Tensor:
        """Run the base model with every scaling at ``scaling_pass_value``; returns ``[b, t, hidden]``.

        With ``scaling_pass_layers = k`` only the first ``k`` decoder layers run, then the final norm;
        ``layers`` overrides ``k`` for this call (e.g. to distil a shallow head, :mod:`xlora.train.distill`).
        """
        if layers is not None:
            check_scaling_pass_layers(layers, self.base_model)
        decoder = self.base_model.base_model
        inputs.setdefault("use_cache", False)  # a base whose config says use_cache=true would build a cache to discard
        k = self.xlora_config.scaling_pass_layers if layers is None else layers
        with torch.no_grad(), self.state.use(constant=self.xlora_config.scaling_pass_value), first_layers(decoder, k):
            if decoder is self.base_model:
                out = self.base_model(**inputs, output_hidden_states=True, return_dict=True)
                return out.hidden_states[-1]
            return decoder(**inputs, return_dict=True).last_hidden_state

    def compute_scalings(self, prefix: PrefixMeans | None = None, hidden: torch.Tensor | None = None,
                         **inputs: Any) -> torch.Tensor:
        """Scaling pass + head: scalings ``[b, t, L, E]`` for ``inputs`` (input_ids, attention_mask, ...);
        ``prefix``: a cache's running means of the states (``head_prefix_mean``) to continue; ``hidden``: the
        scaling pass's output ``[b, t, hidden]`` when the caller already has it (then only the head runs)."""
        hidden = (self.scaling_pass(**inputs) if hidden is None else hidden).to(self.head.layers[0].weight.dtype)
        return self.head(head_input(self.xlora_config, hidden, inputs.get("attention_mask"), prefix))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        scalings: ScalingsSpec = None,
        logits_to_keep: int | torch.Tensor = 0,
        observer: ScalingsObserver | None = None,
        **kwargs: Any,
    ) -> XLoraOutput:
        """Two-pass forward. ``scalings`` (or :meth:`fixed_scalings`) bypasses the scaling pass and head.

        With ``cache`` (an :class:`~xlora.generation.XLoraCache`) both passes run incrementally on
        the new tokens only; ``use_cache=True`` without a cache starts a new one. ``observer``
        (anything with ``record(scalings, input_ids, attention_mask)``, e.g.
        :class:`~xlora.analysis.ScalingsLog`) receives the scalings this call applied.

        Returns:
            :class:`XLoraOutput` with ``logits`` ``[b, t, vocab]``, ``loss`` when ``labels`` are
            given, the ``scalings`` ``[b, t, L, E]`` that were applied and the ``cache``.
        """
        self._check_loaded()
        if input_ids is None and inputs_embeds is None:
            raise ValueError("forward needs input_ids or inputs_embeds")
        kwargs.pop("return_dict", None)  # always a ModelOutput
        ref = input_ids if input_ids is not None else inputs_embeds
        b, t = ref.shape[0], ref.shape[1]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                  "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        cache, use_cache = self._cache_for(cache, use_cache)
        main = dict(inputs, labels=labels, cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep,
                    return_dict=True, **kwargs)
        if self._adapters_disabled:  # exactly the base model: one pass, no head, no experts
            out = self.base_model(**main)
            return XLoraOutput(loss=out.loss, logits=out.logits, cache=out.cache, hidden_states=out.hidden_states,
                               attentions=out.attentions)
        fixed = self.resolve_scalings(scalings) if scalings is not None else self._fixed_scalings
        g = self.xlora_config.global_scaling_weight  # folded: [L, E] scalings at inference, prompt granularity's steps
        s, folded = self._fixed_experts(fixed, b, t, g) if fixed is not None else self.step_experts(inputs, cache)
        if observer is not None:
            observer.record(s, input_ids, attention_mask)
        top_k = self.xlora_config.top_k if fixed is None else None  # the head's scalings: k nonzero at most
        # an expert on the output layer needs every position its scalings cover: its logits are cut after it
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        cut = self._output_adapted and not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
        with self.state.use(scalings=s, global_weight=g, top_k=top_k, folded=folded,
                            coefficients=None if folded else self.columns.coefficients(s, g)):
            out = self.base_model(**(dict(main, logits_to_keep=0) if cut else main))
        return XLoraOutput(loss=out.loss, logits=out.logits[:, keep] if cut else out.logits, cache=out.cache,
                           hidden_states=out.hidden_states, attentions=out.attentions, scalings=s)

    def _cache_for(self, cache: Cache | None, use_cache: bool | None) -> tuple[Cache | None, bool]:
        """The cache a forward uses: the caller's, a new one for ``use_cache=True``, or none."""
        if use_cache is None:
            use_cache = cache is not None
        elif cache is not None and not use_cache:
            raise ValueError("forward(cache=..., use_cache=False) would leave the cache behind its tokens: "
                             "pass use_cache=True with a cache, or no cache to recompute without one")
        return (self.new_cache() if use_cache and cache is None else cache), use_cache

    # ------------------------------------------------------------------ save / load
    def trainable_expert_weights(self) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per expert, ``{module: (A, B)}`` read back from the fused layers."""
        out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in self.experts]
        for name, layer in zip(self.adapted_modules, self.mixture_layers()):
            for e, ab in layer.expert_weights().items():
                out[e][name] = ab
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, bundle: bool = False, format: str = "ours",
                        state_dict: dict[str, torch.Tensor] | None = None, is_main_process: bool | None = None) -> None:
        """Write ``xlora_config.json`` and ``xlora_head.safetensors`` (atomically); see :func:`xlora.saving.save_model`.

        Hugging Face's ``Trainer`` calls this for its checkpoints and ``save_model()``, with
        ``state_dict`` and ``is_main_process``: then the trainable tensors (the head, and the experts
        with ``use_trainable_adapters``) are also written to ``model.safetensors`` under this model's
        parameter names, which ``Trainer.train(resume_from_checkpoint=...)`` loads back. The frozen base
        is never written. Only the main process writes.
        """
        if is_main_process is False:
            return
        save_model(self, save_directory, bundle=bundle, format=format)
        if is_main_process is not None or state_dict is not None:
            save_trainer_weights(self, save_directory, state_dict)

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """The frozen base's state keys: what a Trainer checkpoint leaves out and its resume finds missing."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict(keep_vars=True) if k not in trainable]

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to tie: a Trainer resume loads only the trainable tensors, the base's (tied) weights stay as they are."""

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base_model: PreTrainedModel | str | os.PathLike | None = None,
                        ordering: str | os.PathLike | None = None, **model_kwargs: Any) -> XLoraModel:
        """Load a directory written by :meth:`save_pretrained` or in another format (``ordering``: a
        mistral.rs ordering file kept elsewhere); see :func:`xlora.saving.load_model`."""
        return load_model(cls, directory, base_model, ordering=ordering, **model_kwargs)
