"""An OpenAI-compatible HTTP server for X-LoRA models (FastAPI + uvicorn).

Endpoints (:data:`~xlora.serve.protocol.ENDPOINTS`): ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events), ``GET /health`` and
``GET /metrics`` (Prometheus text), answered by :class:`~xlora.serve.service.OpenAIService`.
Requests are decoded in dynamic batches by :class:`~xlora.serve.batcher.Batcher`. The extension field
``"xlora": {"return_scalings": true}`` adds, per generated token, the expert weights averaged over
the adapted layers (``E`` floats) and the expert names; ``"ignore_eos": true`` decodes past EOS.

Shutdown (SIGTERM or Ctrl-C): new requests get 503 at once; running ones get ``shutdown_timeout_s``
to finish, then the batcher ends them itself (a stream gets a final error event, a plain request a
JSON 503); uvicorn's own grace period is :data:`SHUTDOWN_MARGIN_S` longer, so it never cuts a
response first. A second SIGTERM ends the running requests at once (still with their error); a
second Ctrl-C is uvicorn's force quit.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from xlora.serve.batcher import Batcher
from xlora.serve.metrics import Metrics
from xlora.serve.protocol import ENDPOINTS, APIError
from xlora.serve.service import OpenAIService
from xlora.serve.settings import ServerConfig

SHUTDOWN_MARGIN_S = 3.0  # uvicorn waits this much longer than the batcher, for the last step and the error events
__all__ = ["SHUTDOWN_MARGIN_S", "ServerConfig", "build_server", "create_app", "serve"]


# ---------------------------------------------------------------------- the app
def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``model``; its batching worker runs while the app's lifespan does.

    ``app.state.batcher`` is the :class:`~xlora.serve.batcher.Batcher`, ``app.state.metrics`` the
    counters, ``app.state.service`` the :class:`~xlora.serve.service.OpenAIService` and
    ``app.state.config`` the :class:`ServerConfig`.
    """
    cfg = config or ServerConfig()
    batcher = Batcher(model, tokenizer, cfg.batcher_config())
    metrics = Metrics(batcher, ENDPOINTS)
    service = OpenAIService(model, tokenizer, cfg, batcher, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.close, cfg.shutdown_timeout_s)

    app = FastAPI(title="X-LoRA", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.service, app.state.config = batcher, metrics, service, cfg
    app.add_middleware(metrics.middleware_class())
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for ep in ENDPOINTS:
        app.add_api_route(ep.path, getattr(service, ep.handler), methods=[ep.method])
    return app


async def _api_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, APIError)
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    """Unknown routes and wrong methods answer in OpenAI's error schema too."""
    assert isinstance(err, StarletteHTTPException)
    body = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body()
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


# ---------------------------------------------------------------------- running it
def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 shutdown_timeout_s: float | None = None) -> Any:
    """A ``uvicorn.Server`` for ``app`` whose exit signal starts the batcher's shutdown.

    The first signal stops new requests (503) and gives running ones ``shutdown_timeout_s`` (default:
    the app's :class:`ServerConfig`); a second one ends them at once (a second SIGINT also makes
    uvicorn force-quit, without waiting for the error responses to go out). uvicorn's own graceful timeout
    is :data:`SHUTDOWN_MARGIN_S` longer, so the batcher's error responses go out before uvicorn cancels.
    """
    import uvicorn

    grace = app.state.config.shutdown_timeout_s if shutdown_timeout_s is None else shutdown_timeout_s

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.batcher.begin_shutdown(0.0 if self.should_exit else grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace + SHUTDOWN_MARGIN_S)  # type: ignore[arg-type]  # a float works
    return _Server(config)


def serve(model_dir: str | os.PathLike, config: ServerConfig | None = None, base_model: str | None = None,
          log_level: str = "info", **base_kwargs: Any) -> None:
    """Load ``model_dir`` (see :func:`~xlora.pretrained.load_model_and_tokenizer`; ``base_kwargs`` such as
    :func:`~xlora.saving.base_load_kwargs` gives go to the base's ``from_pretrained``) and serve it until interrupted.

    Clients may name the model by ``config.model_name`` or by ``model_dir``, as given or absolute.
    """
    from xlora.pretrained import load_model_and_tokenizer

    cfg = (config or ServerConfig()).serving(model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, base_model=base_model, **base_kwargs)
    build_server(create_app(model, tokenizer, cfg), cfg.host, cfg.port, log_level).run()
