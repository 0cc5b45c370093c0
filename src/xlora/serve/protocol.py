"""The OpenAI wire format for the server: request schemas, errors, response bodies and SSE chunks.

Responses follow OpenAI's completions and chat completions objects. With
``"xlora": {"return_scalings": true}`` each choice carries ``"xlora": {"scalings": [[E floats], ...],
"token_ids": [...]}`` (one entry per generated token: the expert weights, averaged over the adapted
layers, of the forward step that produced it, including tokens of a trimmed stop string), and the
body carries ``"xlora": {"experts": [names]}``; stream chunks carry the same per token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import Response

from xlora.serve.batcher import FinishEvent, Job, TokenEvent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class XLoraOptions(_Strict):
    return_scalings: bool = False
    ignore_eos: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are ignored, unless UNSUPPORTED
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    xlora: XLoraOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# field -> values that mean "not used"; anything else is a 400 rather than silently ignored
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An error answered in OpenAI's schema ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class ResponseStream:
    """Turns one request's batcher events into an OpenAI response or its stream of chunks."""

    def __init__(self, kind: str, model_name: str, experts: list[str], jobs: list[Job], events: asyncio.Queue,
                 on_finish: Callable[[FinishEvent], None], req: CommonRequest) -> None:
        self.kind, self.model, self.experts, self.jobs, self.events = kind, model_name, experts, jobs, events
        self.on_finish, self.req = on_finish, req
        self.chat = kind == "chat.completion"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.open = len(jobs)
        self.texts = [""] * len(jobs)
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.scalings: list[list[list[float]]] = [[] for _ in jobs]
        self.finish: list[FinishEvent | None] = [None] * len(jobs)

    async def watch_disconnect(self, receive: Callable[[], Any]) -> None:
        """Cancel this request's rows as soon as the client disconnects (the body is already read)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.events.put_nowait((-1, None))  # wakes a reader blocked on the queue

    def _apply(self, i: int, ev: TokenEvent | FinishEvent | None) -> tuple[int, TokenEvent | FinishEvent | None]:
        if isinstance(ev, TokenEvent):
            self.texts[i] += ev.text
            self.ids[i].append(ev.token_id)
            if ev.scalings is not None:
                self.scalings[i].append(ev.scalings)
        elif isinstance(ev, FinishEvent):
            self.finish[i] = ev
            self.open -= 1
            self.on_finish(ev)
        return i, ev

    def usage(self) -> dict[str, int]:
        prompt = sum(f.prompt_tokens for f in self.finish if f) // max(1, self.req.n)
        completion = sum(f.completion_tokens for f in self.finish if f)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _failure(self) -> APIError | None:
        bad = next((f for f in self.finish if f and f.reason in ("error", "cancelled")), None)
        if bad is None:
            return None
        if bad.reason == "cancelled":
            return APIError(503, bad.error or "The request was cancelled: the server is shutting down.",
                            code="cancelled")
        return APIError(500, f"Generation failed: {bad.error}", code="internal_error")

    async def collect(self, request: Request) -> dict[str, Any]:
        """Wait for every choice (cancelling them if the client goes away); the full response body."""
        watcher = asyncio.ensure_future(self.watch_disconnect(request.receive))
        try:
            while self.open:
                if self._apply(*await self.events.get())[1] is None:  # nobody will read the answer
                    raise APIError(499, "The client closed the request.", code="client_closed")
        finally:
            watcher.cancel()
            if self.open:
                self.cancel()
        if err := self._failure():
            raise err
        choices = []
        for i, f in enumerate(self.finish):
            c: dict[str, Any] = {"index": i, "finish_reason": f.reason}
            if self.chat:
                c["message"] = {"role": "assistant", "content": self.texts[i]}
            else:
                c.update(text=self.texts[i], logprobs=None)
            if self.scalings[i]:
                c["xlora"] = {"scalings": self.scalings[i], "token_ids": self.ids[i]}
            choices.append(c)
        body = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
        if any(self.scalings):
            body["xlora"] = {"experts": self.experts}
        return body

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per released piece of text (or per token with scalings)."""
        if self.chat:
            for i in range(len(self.jobs)):
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while self.open:
            i, ev = self._apply(*await self.events.get())
            if ev is None:
                return  # cancelled: the client is gone
            if isinstance(ev, TokenEvent) and (ev.text or ev.scalings is not None):
                c: dict[str, Any] = {"index": i, "finish_reason": None}
                c.update({"delta": {"content": ev.text}} if self.chat else {"text": ev.text, "logprobs": None})
                extra = {}
                if ev.scalings is not None:
                    c["xlora"] = {"scalings": [ev.scalings], "token_ids": [ev.token_id]}
                    extra["xlora"] = {"experts": self.experts}
                yield self._chunk([c], **extra)
            elif isinstance(ev, FinishEvent):
                if ev.reason in ("error", "cancelled"):
                    yield f"data: {json.dumps(self._failure().body())}\n\n"
                    continue
                c = {"index": i, "finish_reason": ev.reason}
                c.update({"delta": {}} if self.chat else {"text": "", "logprobs": None})
                yield self._chunk([c])
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield self._chunk([], usage=self.usage())
        yield "data: [DONE]\n\n"


class SSEResponse(Response):
    """Streams :meth:`ResponseStream.chunks`; a disconnect (or a failed send) cancels the request's rows at once."""

    media_type = "text/event-stream"

    def __init__(self, stream: ResponseStream) -> None:  # no Response.__init__: it would send Content-Length
        self.status_code, self.background, self.stream = 200, None, stream
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watcher = asyncio.ensure_future(self.stream.watch_disconnect(receive))
        chunks = self.stream.chunks()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we wrote
        finally:
            watcher.cancel()
            await chunks.aclose()
            if self.stream.open:
                self.stream.cancel()


