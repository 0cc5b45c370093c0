"""An OpenAI-compatible HTTP server for X-LoRA models (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events), ``GET /health`` and ``GET /metrics`` (Prometheus text).
Requests are decoded in dynamic batches by :class:`~xlora.serve.batcher.Batcher`. The extension field
``"xlora": {"return_scalings": true}`` adds, per generated token, the expert weights averaged over
the adapted layers (``E`` floats) and the expert names; ``"ignore_eos": true`` decodes past EOS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from xlora.serve.batcher import Batcher, BatcherConfig, QueueFull, SamplingParams, ShuttingDown
from xlora.serve.metrics import Metrics
from xlora.serve.protocol import (
    UNSUPPORTED,
    APIError,
    ChatRequest,
    CommonRequest,
    CompletionRequest,
    ResponseStream,
    SSEResponse,
    XLoraOptions,
)


@dataclass
class ServerConfig:
    """Settings of :func:`create_app` / :func:`serve`.

    Args:
        model_name: the id clients send as ``model`` (default: the model directory's name).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (else 401).
        host, port: where :func:`serve` listens.
        max_batch, batch_window_ms, max_queue: see :class:`~xlora.serve.batcher.BatcherConfig`.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for (else 400).
        max_prompt_tokens: the longest prompt in tokens (default: the model's context length).
        max_body_bytes: the largest request body (else 413).
        max_n: the most choices (``n`` times prompts) in one request.
        shutdown_timeout_s: on shutdown, running requests get this long to finish, then are cancelled.
    """

    model_name: str = "xlora"
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
        if self.api_key == "":
            raise ValueError("api_key is empty: pass a real key or None for no authentication")
        self.batcher_config()  # validates max_batch, batch_window_ms, max_queue

    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(max_batch=self.max_batch, batch_window_ms=self.batch_window_ms, max_queue=self.max_queue)


# ---------------------------------------------------------------------- the app
def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``model``; its batching worker runs while the app's lifespan does.

    ``app.state.batcher`` is the :class:`~xlora.serve.batcher.Batcher`; ``app.state.metrics`` the counters.
    """
    cfg = config or ServerConfig()
    batcher = Batcher(model, tokenizer, cfg.batcher_config())
    metrics = Metrics(batcher)
    experts = list(model.xlora_config.expert_names)
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
    max_prompt = cfg.max_prompt_tokens or (context - 1 if context else 1 << 30)
    vocab = getattr(text_cfg, "vocab_size", None) or len(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.close, cfg.shutdown_timeout_s)

    app = FastAPI(title="X-LoRA", lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    app.add_middleware(metrics.middleware_class())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)  # unknown routes, wrong methods: OpenAI's schema too
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        body = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        authorize(request)
        if not batcher.accepting:
            raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise APIError(413, f"Request body of {length} bytes exceeds the limit of {cfg.max_body_bytes}.",
                           code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > cfg.max_body_bytes:
                raise APIError(413, f"Request body exceeds the limit of {cfg.max_body_bytes} bytes.",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"The request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise APIError(422, f"Invalid value for '{loc}': {first['msg']}.", param=loc,
                           code="invalid_value") from None
        for name, fine in UNSUPPORTED.items():
            value = data.get(name)
            if name in data and value not in fine:
                raise APIError(400, f"'{name}'={value!r} is not supported by this server; leave it unset.",
                               param=name, code="unsupported_parameter")
        if req.model != cfg.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{cfg.model_name}'.",
                           param="model", code="model_not_found")
        return req

    def encode(fn: Any, *args: Any, **kwargs: Any) -> Any:
        with batcher.tokenizer_lock:
            return fn(*args, **kwargs)

    def sampling(req: CommonRequest, prompt_len: int, max_tokens: int | None, default: int | None,
                 param: str) -> SamplingParams:
        if prompt_len > max_prompt:
            raise APIError(400, f"The prompt has {prompt_len} tokens; the limit is {max_prompt}.", param=param,
                           code="context_length_exceeded")
        room = context - prompt_len if context else cfg.max_tokens_limit
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens_limit}.",
                           param="max_tokens", code="invalid_value")
        want = max_tokens if max_tokens is not None else min(default or room, room, cfg.max_tokens_limit)
        if want > room or room < 1:
            raise APIError(400, f"The prompt ({prompt_len} tokens) plus max_tokens={want} exceed the model's "
                                f"context length of {context} tokens; shorten the prompt or lower max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"{len(stops)} stop strings given; at most 16 are allowed.", param="stop",
                           code="invalid_value")
        ext = req.xlora or XLoraOptions()
        try:
            return SamplingParams(max_tokens=want, temperature=req.temperature, top_p=req.top_p,
                                  stop=tuple(s for s in stops if s), seed=req.seed,
                                  return_scalings=ext.return_scalings, ignore_eos=ext.ignore_eos)
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value") from None

    async def run(request: Request, kind: str, req: CommonRequest, prompts: list[list[int]],
                  params: list[SamplingParams]) -> Response:
        if len(prompts) * req.n > cfg.max_n:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} choices exceed the limit of {cfg.max_n}.",
                           param="n", code="invalid_value")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []

        def sink_for(index: int):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev))

        try:
            for ids, p in zip(prompts, params):
                for k in range(req.n):  # choice k samples with seed + k: reproducible, yet distinct choices
                    seeded = dataclasses.replace(p, seed=p.seed + k) if p.seed is not None else p
                    jobs.append(batcher.submit(ids, seeded, sink_for(len(jobs))))
        except (QueueFull, ShuttingDown) as err:
            for job in jobs:
                job.cancel()
            status, code = (429, "queue_full") if isinstance(err, QueueFull) else (503, "shutting_down")
            raise APIError(status, f"{err}; retry later.", code=code) from None
        on_finish = lambda ev: metrics.count_tokens(ev.prompt_tokens, ev.completion_tokens)  # noqa: E731
        stream = ResponseStream(kind, cfg.model_name, experts, jobs, events, on_finish, req)
        if req.stream:
            return SSEResponse(stream)
        return JSONResponse(await stream.collect(request))

    @app.get("/health")
    async def health() -> JSONResponse:
        state = "ok" if batcher.accepting else "shutting_down"
        return JSONResponse({"status": state, "queue_length": batcher.queue_length, "active": batcher.active_rows},
                            status_code=200 if batcher.accepting else 503)

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    card = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "xlora", "xlora": {"experts": experts}}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> JSONResponse:
        authorize(request)
        if model_id != cfg.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(card)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(422, "Invalid value for 'prompt': it must not be empty.", param="prompt",
                           code="invalid_value")
        prompts = []
        for p in raw:
            ids = p if not isinstance(p, str) else (await run_in_threadpool(encode, tokenizer, p))["input_ids"]
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"The prompt must hold 1 or more tokens with ids in 0..{vocab - 1}.",
                               param="prompt", code="invalid_value")
            prompts.append(list(ids))
        params = [sampling(req, len(p), req.max_tokens, 16, "prompt") for p in prompts]
        return await run(request, "text_completion", req, prompts, params)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatRequest = await parse(request, ChatRequest)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions.",
                           param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(part.text for part in m.content)} for m in req.messages]
        try:
            enc = await run_in_threadpool(encode, tokenizer.apply_chat_template, messages,
                                          add_generation_prompt=True, tokenize=True, return_dict=True)
        except Exception as err:  # noqa: BLE001 - a template may raise on messages it does not accept
            raise APIError(400, f"The chat template rejected the messages: {err}", param="messages",
                           code="invalid_value") from None
        ids = list(enc["input_ids"])
        params = sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, None, "messages")
        return await run(request, "chat.completion", req, [ids], [params])

    return app


# ---------------------------------------------------------------------- running it
def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 shutdown_timeout_s: float = 30.0) -> Any:
    """A ``uvicorn.Server`` whose exit signal first stops the batcher taking new requests (503)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.batcher.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout_s)  # type: ignore[arg-type]  # a float works
    return _Server(config)


def serve(model_dir: str | os.PathLike, config: ServerConfig | None = None, base_model: str | None = None,
          log_level: str = "info") -> None:
    """Load ``model_dir`` (see :func:`~xlora.model.load_model_and_tokenizer`) and serve it until interrupted."""
    from xlora.saving import load_model_and_tokenizer

    cfg = config or ServerConfig()
    model, tokenizer = load_model_and_tokenizer(model_dir, base_model=base_model)
    build_server(create_app(model, tokenizer, cfg), cfg.host, cfg.port, log_level, cfg.shutdown_timeout_s).run()
