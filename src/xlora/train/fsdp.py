"""Fully sharded head training (FSDP2 ``fully_shard``) under ``accelerate launch`` with an FSDP config.

What is big is frozen: the base model and the experts. Each decoder layer (the base's
``_no_split_modules``) and then the whole model are ``fully_shard``-ed, so a process holds ``1/N``
of their weights and gathers one layer at a time, in each of the two passes of a step (and again
in the backward of the main pass). What is trained is small: the scaling head
(and the experts with ``use_trainable_adapters``) stays whole on every process (FSDP's
``ignored_params``), :func:`sync_gradients` averages its gradients as DDP would, and checkpoints
save and resume it exactly as in one process. xlora shards with FSDP2 whatever ``fsdp_version``
the Accelerate config names (it reads ``fsdp_reshard_after_forward``; other FSDP options do not apply).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from xlora.train.errors import TrainingError


def fsdp_requested(accelerator: Any) -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with ``distributed_type: FSDP``)."""
    from accelerate.utils import DistributedType

    env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # Accelerate ignores it on CPU
    return accelerator.num_processes > 1 and (env or accelerator.distributed_type == DistributedType.FSDP)


BUNDLE_REFUSED = ("bundle=True writes the experts, which FSDP holds in shards: train without --bundle, "
                  "then copy the experts in with `xlora convert OUTPUT_DIR BUNDLED_DIR`")


def shard(model: Any) -> Any:
    """``fully_shard`` the frozen parameters of ``model`` (an XLoraModel, in place); the trainable ones stay whole."""
    from torch.distributed.fsdp import fully_shard

    base = model.base_model
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    if not blocks:
        raise TrainingError(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to shard by: "
                            "train it without FSDP (DDP: examples/accelerate_ddp.yaml)")
    keep = {p for p in model.parameters() if p.requires_grad}
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no_shard")
    for module in list(base.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, ignored_params=keep, reshard_after_forward=reshard)
    # the root group is the X-LoRA model: its forward runs first (the scaling pass calls the decoder
    # directly), and it holds the embeddings, final norm and LM head (tied or not) for the whole step
    return fully_shard(model, ignored_params=keep, reshard_after_forward=reshard)


def sync_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of the unsharded trainable ``params`` over the ``world`` processes (one all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))
