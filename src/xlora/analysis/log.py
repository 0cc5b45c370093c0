"""The scalings log: what a model applied, call by call, as an observer passed to forward/generate.

Shapes: ``b`` batch, ``t`` tokens, ``L`` adapted modules (``model.adapted_modules``), ``E`` experts.
A log entry is one forward call: the scalings ``[b, t, L, E]`` it applied to its input tokens
``[b, t]``. Row ``t`` of a sequence is therefore "the mixture used while reading token ``t``",
which is the mixture that predicted token ``t + 1``.
The statistics over a log's rows live in :mod:`xlora.analysis.stats`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from xlora.analysis.stats import ExpertStats, expert_stats
from xlora.files import atomic_save_safetensors

LOG_FORMAT = "xlora-scalings-log/1"
_META_KEY = "xlora_scalings_log"


@dataclass
class LogEntry:
    """One forward call: ``scalings`` ``[b, t, L, E]``, ``input_ids`` and ``attention_mask`` ``[b, t]``."""

    scalings: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class ScalingsLog:
    """The scalings of successive forward calls, with the expert and layer names they refer to.

    It is a scalings observer: pass it as ``model(..., observer=log)`` or
    ``model.generate(..., observer=log)`` and every forward call is appended; or call
    :meth:`record` with one forward's ``out.scalings``.

    Args:
        expert_names: the ``E`` axis, ``model.xlora_config.expert_names``.
        layer_names: the ``L`` axis, ``model.adapted_modules``.
        info: free-form JSON-serialisable context saved with the log (prompt, model path, ...).
    """

    def __init__(self, expert_names: Sequence[str], layer_names: Sequence[str],
                 info: dict[str, Any] | None = None) -> None:
        self.expert_names = list(expert_names)
        self.layer_names = list(layer_names)
        self.info: dict[str, Any] = dict(info or {})
        self.entries: list[LogEntry] = []

    @classmethod
    def for_model(cls, model: Any, info: dict[str, Any] | None = None) -> ScalingsLog:
        """An empty log with ``model``'s expert names and adapted module names."""
        return cls(model.xlora_config.expert_names, model.adapted_modules, info)

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, scalings: torch.Tensor, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> None:
        """Append one forward call's scalings ``[b, t, L, E]``.

        ``attention_mask`` may cover the past tokens too (``[b, past + t]``, as ``generate`` passes
        it); only its last ``t`` columns are kept. Tensors are detached, not copied to the CPU.
        """
        if scalings.dim() != 4 or tuple(scalings.shape[2:]) != (len(self.layer_names), len(self.expert_names)):
            raise ValueError(
                f"scalings of shape {tuple(scalings.shape)} do not fit this log's "
                f"[b, t, L={len(self.layer_names)}, E={len(self.expert_names)}]: was it made for another model?"
            )
        b, t = scalings.shape[:2]
        for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if x is not None and (x.dim() != 2 or x.shape[0] != b or x.shape[1] < t):
                raise ValueError(f"{name} of shape {tuple(x.shape)} does not cover scalings [b={b}, t={t}, ...]")
        self.entries.append(LogEntry(
            scalings.detach(),
            None if input_ids is None else input_ids[:, -t:].detach(),
            None if attention_mask is None else attention_mask[:, -t:].detach(),
        ))

    def sequence(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch row ``row`` over all entries, padding dropped: ``(ids [T], scalings [T, L, E])`` on the CPU.

        Entries without ``input_ids`` get id ``-1``.
        """
        ids, rows = [], []
        for e in self.entries:
            keep = torch.ones(e.scalings.shape[1], dtype=torch.bool) if e.attention_mask is None \
                else e.attention_mask[row].cpu().bool()
            rows.append(e.scalings[row].cpu()[keep])
            x = e.input_ids[row].cpu() if e.input_ids is not None else torch.full(keep.shape, -1)
            ids.append(x[keep])
        if not rows:
            return torch.empty(0, dtype=torch.long), torch.empty(0, len(self.layer_names), len(self.expert_names))
        return torch.cat(ids), torch.cat(rows)

    def expert_stats(self, row: int = 0) -> ExpertStats:
        """:func:`~xlora.analysis.stats.expert_stats` of batch row ``row`` (padding dropped), with the
        log's expert names and its adapted modules' names (``model.layers.3.self_attn.q_proj``, ...)."""
        return expert_stats(self.sequence(row)[1], self.expert_names, self.layer_names)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (atomically); names and ``info`` go in its header as JSON."""
        tensors: dict[str, torch.Tensor] = {}
        kinds = []
        for i, e in enumerate(self.entries):
            tensors[f"{i}.scalings"] = e.scalings
            kinds.append([k for k in ("input_ids", "attention_mask") if getattr(e, k) is not None])
            for k in kinds[-1]:
                tensors[f"{i}.{k}"] = getattr(e, k)
        meta = {"format": LOG_FORMAT, "expert_names": self.expert_names, "layer_names": self.layer_names,
                "entries": kinds, "info": self.info}
        path = Path(path)
        atomic_save_safetensors(path, tensors, metadata={"format": "pt", _META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScalingsLog:
        """Read a file written by :meth:`save`; tensors come back bit-exact (same dtype and values)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scalings log {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not a scalings log written by ScalingsLog.save ({err!r})") from None
        if meta.get("format") != LOG_FORMAT:
            raise ValueError(f"{str(path)!r} has format {meta.get('format')!r}; this xlora reads {LOG_FORMAT!r}")
        log = cls(meta["expert_names"], meta["layer_names"], meta.get("info"))
        for i, kinds in enumerate(meta["entries"]):
            extra = {k: tensors[f"{i}.{k}"] for k in kinds}
            log.entries.append(LogEntry(tensors[f"{i}.scalings"], **extra))
        return log
