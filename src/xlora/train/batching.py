"""The order of training batches: which examples go together, a pure function of the seed and the epoch."""

from __future__ import annotations

import torch


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; a pure function of its arguments.

    A permutation of ``range(len(lengths))`` (from a ``torch.Generator`` seeded with ``seed`` and
    ``epoch``) cut into batches of ``batch_size``; only the last batch may be smaller. With
    ``group_by_length``, the permutation is cut into mega-chunks of ``50 * batch_size`` examples,
    each sorted by length (longest first) before batching, and the order of the full batches is
    shuffled again, so a batch holds examples of similar length (less padding).

    Every index appears exactly once; each ``(seed, epoch)`` gets its own order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = 50 * batch_size
        # sorted() is stable, so ties keep their shuffled order: still deterministic.
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda i: -lengths[i])]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if group_by_length:
        # Mega-chunks are whole multiples of batch_size, so only the final batch can be short; keep it last.
        tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()] + tail
    return batches
