"""The lifecycle API a PEFT user expects of :class:`~xlora.model.XLoraModel`.

``disable_adapters()`` (the base model alone), ``unload()`` (the original modules back), parameter
counts, input embeddings, gradient checkpointing with exact recomputation, and ``to()`` that keeps
the base, the experts and the head together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class LifecycleMixin:
    """Mixed into :class:`~xlora.model.XLoraModel`; uses its ``base_model``, ``state``,
    ``adapted_modules`` and ``mixture_layers()``."""

    _adapters_disabled: bool = False
    _unloaded: bool = False

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside ``with model.disable_adapters():`` a forward is exactly the base model's: one pass,
        no scaling pass, no head, no expert matmuls (``out.scalings`` is ``None``)."""
        saved, self._adapters_disabled = self._adapters_disabled, True
        try:
            yield
        finally:
            self._adapters_disabled = saved

    def unload(self) -> nn.Module:
        """Put every original module back and return the base model, untouched: its state dict and
        ``requires_grad`` flags are those it had before X-LoRA wrapped it. This model is unusable after."""
        self._check_loaded()
        base = self.base_model
        for name, layer in zip(self.adapted_modules, self.mixture_layers()):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, layer.base_layer)
        for name, p in base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, p.requires_grad))
        if base.is_activation_checkpointing and not self._base_was_checkpointing:
            base.activation_checkpointing_disable()
        self._unloaded = True
        return base

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise RuntimeError("this XLoraModel was unload()-ed: its base model was handed back; build a new one")

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; a 4-bit base's packed weights count two per byte (as PEFT)."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: T || all params: A || trainable%: P`` (PEFT's line)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, as ``PreTrainedModel.num_parameters`` (which Hugging Face's Trainer calls)."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    # ------------------------------------------------------------------ checkpointing and devices
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute the base's decoder layers in the backward pass instead of keeping activations.

        Non-reentrant ``torch.utils.checkpoint`` with a ``context_fn`` that replays the scalings in
        force during the forward, so the recomputation is exact (head gradients equal to the run
        without checkpointing). ``use_reentrant=True`` cannot carry that context and is refused.
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant"):
            raise ValueError("gradient_checkpointing_kwargs={'use_reentrant': True} cannot replay the X-LoRA "
                             "scalings in the recomputation; leave use_reentrant unset (False)")
        if "context_fn" in kwargs:
            raise ValueError("gradient_checkpointing_kwargs may not set context_fn: X-LoRA supplies its own")
        kwargs.update(use_reentrant=False, context_fn=self.state.checkpoint_contexts)
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.activation_checkpointing_disable()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (the same, exact recomputation)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base_model.is_activation_checkpointing

    is_gradient_checkpointing = is_activation_checkpointing  # the older name, as PEFT has it

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move/cast base, experts and head together. The base goes first, through transformers' own
        checks (a quantised base refuses a dtype cast with transformers' error)."""
        self.base_model.to(*args, **kwargs)
        return nn.Module.to(self, *args, **kwargs)

