"""The OpenAI-compatible service: one method per endpoint of :data:`~xlora.serve.protocol.ENDPOINTS`.

The FastAPI routes are thin: each calls the method its table entry names. A generating endpoint
reads and checks the request (auth, size, schema, model, limits), encodes its prompts with
:func:`~xlora.generation.encode_prompt`, submits one batcher job per choice and answers through a
:class:`~xlora.serve.responses.ResponseStream`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from xlora.generation import encode_prompt
from xlora.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from xlora.serve.metrics import Metrics
from xlora.serve.protocol import APIError, ChatRequest, CommonRequest, CompletionRequest, XLoraOptions, parse_request
from xlora.serve.responses import CHAT, COMPLETION, ResponseFormat, ResponseStream, SSEResponse
from xlora.serve.sampling import SamplingParams
from xlora.serve.settings import ServerConfig


class OpenAIService:
    """Answers the endpoints for ``model`` (an :class:`~xlora.model.XLoraModel`) decoded by ``batcher``."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig, batcher: Batcher, metrics: Metrics) -> None:
        self.tokenizer, self.cfg, self.batcher, self.stats = tokenizer, config, batcher, metrics
        self.experts = list(model.xlora_config.expert_names)
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)
        self.max_prompt = config.max_prompt_tokens or (self.context - 1 if self.context else 1 << 30)
        self.vocab = getattr(text_cfg, "vocab_size", None) or len(tokenizer)
        self.card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "xlora",
                     "xlora": {"experts": self.experts}}

    # ------------------------------------------------------------------ endpoints
    async def health(self) -> JSONResponse:
        up = self.batcher.accepting
        return JSONResponse({"status": "ok" if up else "shutting_down", "queue_length": self.batcher.queue_length,
                             "active": self.batcher.active_rows}, status_code=200 if up else 503)

    async def prometheus(self) -> PlainTextResponse:
        return PlainTextResponse(self.stats.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.card]})

    async def model_card(self, request: Request, model_id: str) -> JSONResponse:
        self.authorize(request)
        if not self.cfg.serves(model_id):
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(self.card)

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self.read(request, CompletionRequest)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(422, "Invalid value for 'prompt': it must not be empty.", param="prompt",
                           code="invalid_value")
        prompts = []
        for p in raw:
            ids = await self.encode(p) if isinstance(p, str) else list(p)
            if not ids or any(not 0 <= t < self.vocab for t in ids):
                raise APIError(400, f"The prompt must hold 1 or more tokens with ids in 0..{self.vocab - 1}.",
                               param="prompt", code="invalid_value")
            prompts.append(ids)
        params = [self.sampling(req, len(p), req.max_tokens, 16, "prompt") for p in prompts]
        return await self.run(request, COMPLETION, req, prompts, params)

    async def chat_completions(self, request: Request) -> Response:
        req: ChatRequest = await self.read(request, ChatRequest)
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions.",
                           param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(part.text for part in m.content)} for m in req.messages]
        try:
            ids = await self.encode(messages)
        except Exception as err:  # noqa: BLE001 - a template may raise on messages it does not accept
            raise APIError(400, f"The chat template rejected the messages: {err}", param="messages",
                           code="invalid_value") from None
        params = self.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, None, "messages")
        return await self.run(request, CHAT, req, [ids], [params])

    # ------------------------------------------------------------------ steps
    def authorize(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read(self, request: Request, schema: type[CommonRequest]) -> Any:
        """The request, authorised, within the size limit, valid, and for this server's model."""
        self.authorize(request)
        if not self.batcher.accepting:
            raise APIError(503, "The server is shutting down; retry on another instance.", code="shutting_down")
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"Request body of {length} bytes exceeds the limit of {limit}.",
                           code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        req = parse_request(bytes(body), schema)
        if not self.cfg.serves(req.model):
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{self.cfg.model_name}'.", param="model", code="model_not_found")
        return req

    async def encode(self, prompt: str | list[dict[str, Any]]) -> list[int]:
        """Token ids of a text (as it is) or of chat messages (the chat template), off the event loop."""
        def run() -> list[int]:
            with self.batcher.tokenizer_lock:
                return encode_prompt(self.tokenizer, prompt)["input_ids"][0].tolist()
        return await run_in_threadpool(run)

    def sampling(self, req: CommonRequest, prompt_len: int, max_tokens: int | None, default: int | None,
                 param: str) -> SamplingParams:
        """The row's :class:`SamplingParams`; a 400 for a prompt or ``max_tokens`` beyond the limits."""
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"{len(stops)} stop strings given; at most 16 are allowed.", param="stop",
                           code="invalid_value")
        ext = req.xlora or XLoraOptions()
        try:
            return SamplingParams(max_tokens=self.budget(prompt_len, max_tokens, default, param),
                                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  repetition_penalty=req.repetition_penalty, stop=tuple(s for s in stops if s),
                                  seed=req.seed, return_scalings=ext.return_scalings, ignore_eos=ext.ignore_eos)
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value") from None

    def budget(self, prompt_len: int, max_tokens: int | None, default: int | None, param: str) -> int:
        """The tokens a row may generate: ``max_tokens``, else ``default`` or what the context leaves."""
        if prompt_len > self.max_prompt:
            raise APIError(400, f"The prompt has {prompt_len} tokens; the limit is {self.max_prompt}.", param=param,
                           code="context_length_exceeded")
        limit = self.cfg.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limit}.",
                           param="max_tokens", code="invalid_value")
        room = self.context - prompt_len if self.context else limit
        want = max_tokens if max_tokens is not None else min(default or room, room, limit)
        if want > room or room < 1:
            raise APIError(400, f"The prompt ({prompt_len} tokens) plus max_tokens={want} exceed the model's "
                                f"context length of {self.context} tokens; shorten the prompt or lower max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return want

    async def run(self, request: Request, fmt: ResponseFormat, req: CommonRequest, prompts: list[list[int]],
                  params: list[SamplingParams]) -> Response:
        """Submit one job per choice and answer with their stream or their collected response."""
        if len(prompts) * req.n > self.cfg.max_n:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} choices exceed the limit of {self.cfg.max_n}.",
                           param="n", code="invalid_value")
        events: asyncio.Queue = asyncio.Queue()
        jobs = self.submit(events, prompts, params, req.n)
        on_finish = lambda ev: self.stats.count_tokens(ev.prompt_tokens, ev.completion_tokens)  # noqa: E731
        usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = ResponseStream(fmt, self.cfg.model_name, self.experts, jobs, events, on_finish, req.n, usage)
        if req.stream:
            return SSEResponse(stream)
        return JSONResponse(await stream.collect(request.receive))

    def submit(self, events: asyncio.Queue, prompts: list[list[int]], params: list[SamplingParams],
               n: int) -> list[Job]:
        """Queue ``n`` jobs per prompt, their events going to ``events``; all or none (429 / 503)."""
        loop, jobs = asyncio.get_running_loop(), []

        def sink_for(index: int):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev))

        try:
            for ids, p in zip(prompts, params):
                for k in range(n):  # choice k samples with seed + k: reproducible, yet distinct choices
                    seeded = dataclasses.replace(p, seed=p.seed + k) if p.seed is not None else p
                    jobs.append(self.batcher.submit(ids, seeded, sink_for(len(jobs))))
        except (QueueFull, ShuttingDown) as err:
            for job in jobs:
                job.cancel()
            status, code = (429, "queue_full") if isinstance(err, QueueFull) else (503, "shutting_down")
            raise APIError(status, f"{err}; retry later.", code=code) from None
        return jobs
