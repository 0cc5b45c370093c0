"""Response bodies and server-sent event streams, in OpenAI's completions and chat completions shapes.

One :class:`ResponseStream` per request turns its rows' batcher events into the full response
(:meth:`~ResponseStream.collect`) or its stream of chunks (:meth:`~ResponseStream.chunks`, sent by
:class:`SSEResponse`); where completions and chat differ is said once, by a :class:`ResponseFormat`.

With ``"xlora": {"return_scalings": true}`` each choice carries ``"xlora": {"scalings": [[E floats],
...], "token_ids": [...]}`` (one entry per generated token: the expert weights, averaged over the
adapted layers, of the forward step that produced it, including tokens of a trimmed stop string), and
the body carries ``"xlora": {"experts": [names]}``; stream chunks carry the same per token.

A request the server cannot finish (it shuts down, or decoding failed) is answered with an error in
OpenAI's shape: a JSON 503/500 when not streamed; when streamed, after the chunks already sent, one
``data: {"error": {...}}`` event and then ``data: [DONE]`` (the official client raises
``openai.APIError`` on the error event; bare SSE readers still see the end of the stream).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from xlora.serve.jobs import FinishEvent, Job, TokenEvent
from xlora.serve.protocol import APIError

DONE = "data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {json.dumps(body)}\n\n"


class ResponseFormat:
    """What a text completion's response looks like; :class:`ChatFormat` overrides the differences."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def content(self, text: str) -> dict[str, Any]:
        """The fields of a whole choice holding ``text``."""
        return {"text": text, "logprobs": None}

    def delta(self, text: str) -> dict[str, Any]:
        """The fields of a stream chunk's choice adding ``text``."""
        return {"text": text, "logprobs": None}

    def end(self) -> dict[str, Any]:
        """The fields of the chunk choice that carries the finish reason."""
        return self.delta("")

    def opening(self) -> dict[str, Any] | None:
        """The fields of a first chunk sent before any text, if the format has one."""
        return None


class ChatFormat(ResponseFormat):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def content(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def delta(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}}

    def end(self) -> dict[str, Any]:
        return {"delta": {}}

    def opening(self) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}


COMPLETION, CHAT = ResponseFormat(), ChatFormat()


def failure(finish: FinishEvent) -> APIError | None:
    """The error a finished row answers with, or ``None`` when it ended normally."""
    if finish.reason == "cancelled":
        return APIError(503, finish.error or "The request was cancelled: the server is shutting down.",
                        code="shutting_down")
    if finish.reason == "error":
        return APIError(500, f"Generation failed: {finish.error}", code="internal_error")
    return None


class ResponseStream:
    """Turns one request's batcher events into an OpenAI response or its stream of chunks.

    Args:
        fmt: :data:`COMPLETION` or :data:`CHAT`.
        model_name, experts: as reported in the bodies.
        jobs: the request's rows (prompts times ``n``), in choice order.
        events: the queue the rows' sinks put ``(choice index, event)`` on.
        on_finish: called with each row's :class:`FinishEvent` (token counts for the metrics).
        n: choices per prompt (the usage counts each prompt once).
        include_usage: end a stream with a usage chunk.
    """

    def __init__(self, fmt: ResponseFormat, model_name: str, experts: list[str], jobs: list[Job],
                 events: asyncio.Queue, on_finish: Callable[[FinishEvent], None], n: int = 1,
                 include_usage: bool = False) -> None:
        self.fmt, self.model, self.experts, self.jobs, self.events = fmt, model_name, experts, jobs, events
        self.on_finish, self.n, self.include_usage = on_finish, n, include_usage
        self.id = f"{fmt.id_prefix}-{uuid.uuid4().hex[:24]}"
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

    async def _next(self) -> tuple[int, TokenEvent | FinishEvent | None]:
        i, ev = await self.events.get()
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
        prompt = sum(f.prompt_tokens for f in self.finish if f) // max(1, self.n)
        completion = sum(f.completion_tokens for f in self.finish if f)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    async def collect(self, receive: Callable[[], Any]) -> dict[str, Any]:
        """Wait for every choice (cancelling them if the client goes away); the full response body."""
        watcher = asyncio.ensure_future(self.watch_disconnect(receive))
        try:
            while self.open:
                if (await self._next())[1] is None:  # nobody will read the answer
                    raise APIError(499, "The client closed the request.", code="client_closed")
        finally:
            watcher.cancel()
            if self.open:
                self.cancel()
        for f in self.finish:
            if err := failure(f):
                raise err
        choices = []
        for i, f in enumerate(self.finish):
            choices.append({"index": i, "finish_reason": f.reason, **self.fmt.content(self.texts[i])})
            if self.scalings[i]:
                choices[-1]["xlora"] = {"scalings": self.scalings[i], "token_ids": self.ids[i]}
        body = {**self._head(self.fmt.object), "choices": choices, "usage": self.usage()}
        if any(self.scalings):
            body["xlora"] = {"experts": self.experts}
        return body

    def _chunk(self, index: int, fields: dict[str, Any], finish_reason: str | None = None) -> str:
        return sse({**self._head(self.fmt.chunk_object),
                    "choices": [{"index": index, "finish_reason": finish_reason, **fields}]})

    def _token_chunk(self, i: int, ev: TokenEvent) -> str:
        choice: dict[str, Any] = {"index": i, "finish_reason": None, **self.fmt.delta(ev.text)}
        body = {**self._head(self.fmt.chunk_object), "choices": [choice]}
        if ev.scalings is not None:
            choice["xlora"] = {"scalings": [ev.scalings], "token_ids": [ev.token_id]}
            body["xlora"] = {"experts": self.experts}
        return sse(body)

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per released piece of text (or per token with scalings)."""
        if (opening := self.fmt.opening()) is not None:
            for i in range(len(self.jobs)):
                yield self._chunk(i, opening)
        while self.open:
            i, ev = await self._next()
            if ev is None:
                return  # cancelled: the client is gone
            if isinstance(ev, TokenEvent) and (ev.text or ev.scalings is not None):
                yield self._token_chunk(i, ev)
            elif isinstance(ev, FinishEvent):
                if err := failure(ev):  # the request cannot complete: one error event ends the stream
                    self.cancel()
                    yield sse(err.body())
                    yield DONE
                    return
                yield self._chunk(i, self.fmt.end(), ev.reason)
        if self.include_usage:
            yield sse({**self._head(self.fmt.chunk_object), "choices": [], "usage": self.usage()})
        yield DONE


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
