"""The server's settings, :class:`ServerConfig`: a leaf module that the app, the service and the
Ray Serve cluster all import (the app re-exports it)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from xlora.serve.batcher import BatcherConfig


@dataclass
class ServerConfig:
    """Settings of :func:`create_app` / :func:`serve`.

    Args:
        model_name: the id clients send as ``model`` (default: the model directory's name); it is the id
            in every response.
        model_aliases: other ids a request may name the model by (:meth:`serving` adds the model
            directory's path, as given and absolute, so ``model="MY_XLORA_DIR"`` works).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (else 401).
        host, port: where :func:`serve` listens.
        max_batch, batch_window_ms, max_queue: see :class:`~xlora.serve.batcher.BatcherConfig`.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for (else 400).
        max_prompt_tokens: the longest prompt in tokens (default: the model's context length).
        max_body_bytes: the largest request body (else 413).
        max_n: the most choices (``n`` times prompts) in one request.
        shutdown_timeout_s: on shutdown, running and queued requests get this long to finish; then
            they are ended with an OpenAI error (an SSE error event, or a JSON 503).
    """

    model_name: str = "xlora"
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 256
    max_tokens_limit: int = 4096
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_body_bytes", "max_n"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None (the context length), "
                             f"got {self.max_prompt_tokens}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.model_name:
            raise ValueError("model_name must be a non-empty string: clients send it as 'model'")
        if isinstance(self.model_aliases, str) or not all(isinstance(a, str) and a for a in self.model_aliases):
            raise ValueError(f"model_aliases must be a tuple of non-empty strings, got {self.model_aliases!r}")
        self.model_aliases = tuple(self.model_aliases)
        if self.api_key == "":
            raise ValueError("api_key is empty: pass a real key or None for no authentication")
        if not (isinstance(self.shutdown_timeout_s, (int, float)) and math.isfinite(self.shutdown_timeout_s)
                and self.shutdown_timeout_s >= 0):
            raise ValueError(f"shutdown_timeout_s must be a number of seconds >= 0, got {self.shutdown_timeout_s!r}")
        self.batcher_config()  # validates max_batch, batch_window_ms, max_queue

    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(max_batch=self.max_batch, batch_window_ms=self.batch_window_ms, max_queue=self.max_queue)

    def serves(self, model_id: str) -> bool:
        """Whether a request naming ``model_id`` is for this server: its ``model_name`` or an alias."""
        return model_id == self.model_name or model_id in self.model_aliases

    def serving(self, model_dir: str | os.PathLike) -> ServerConfig:
        """This config with ``model_dir`` (as given, and absolute) among the aliases."""
        given = os.fspath(model_dir)
        new = [a for a in (given, given.rstrip("/") or given, str(Path(given).resolve()))
               if a != self.model_name and a not in self.model_aliases]
        return dataclasses.replace(self, model_aliases=(*self.model_aliases, *dict.fromkeys(new)))
