"""Response bodies and SSE streams (xlora.serve.responses): exact bytes for completions and chat, errors included."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai import OpenAI

from xlora.serve.jobs import FinishEvent, Job, TokenEvent
from xlora.serve.protocol import APIError
from xlora.serve.responses import CHAT, COMPLETION, ResponseStream
from xlora.serve.sampling import SamplingParams

SHUTDOWN = "the server is shutting down and this request did not finish within its shutdown timeout of 2 s"


def make_stream(fmt, events, n_jobs=1, n=1, include_usage=False, finished=None):
    queue: asyncio.Queue = asyncio.Queue()
    for item in events:
        queue.put_nowait(item)
    jobs = [Job([1, 2, 3], SamplingParams(), lambda ev: None) for _ in range(n_jobs)]
    on_finish = (finished.append if finished is not None else lambda ev: None)
    stream = ResponseStream(fmt, "m", ["a", "b"], jobs, queue, on_finish, n=n, include_usage=include_usage)
    stream.id, stream.created = "id-0", 0  # fixed, to compare whole bodies
    return stream


def run_chunks(stream) -> list[dict | str]:
    async def go():
        return [c async for c in stream.chunks()]
    out = asyncio.run(go())
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in out)
    return [json.loads(c[6:]) if c != "data: [DONE]\n\n" else "[DONE]" for c in out]


async def _never():
    await asyncio.Event().wait()


def run_collect(stream) -> dict:
    return asyncio.run(stream.collect(_never))


HEAD = {"id": "id-0", "created": 0, "model": "m"}


def test_completion_stream_is_openai_text_completion_chunks():
    events = [(0, TokenEvent("He", 5)), (0, TokenEvent("", 6)), (0, TokenEvent("y", 7)),
              (0, FinishEvent("length", 3, 3))]
    finished: list[FinishEvent] = []
    got = run_chunks(make_stream(COMPLETION, events, include_usage=True, finished=finished))
    chunk = {**HEAD, "object": "text_completion"}
    assert got == [
        {**chunk, "choices": [{"index": 0, "finish_reason": None, "text": "He", "logprobs": None}]},
        {**chunk, "choices": [{"index": 0, "finish_reason": None, "text": "y", "logprobs": None}]},
        {**chunk, "choices": [{"index": 0, "finish_reason": "length", "text": "", "logprobs": None}]},
        {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}},
        "[DONE]",
    ]  # the token that released no text sent no chunk
    assert finished == [FinishEvent("length", 3, 3)]


def test_chat_stream_opens_with_the_role_and_carries_scalings_per_token():
    events = [(0, TokenEvent("Hi", 9, [0.25, 0.75])), (0, FinishEvent("stop", 3, 1))]
    got = run_chunks(make_stream(CHAT, events))
    chunk = {**HEAD, "object": "chat.completion.chunk"}
    assert got == [
        {**chunk, "choices": [{"index": 0, "finish_reason": None, "delta": {"role": "assistant", "content": ""}}]},
        {**chunk, "choices": [{"index": 0, "finish_reason": None, "delta": {"content": "Hi"},
                               "xlora": {"scalings": [[0.25, 0.75]], "token_ids": [9]}}],
         "xlora": {"experts": ["a", "b"]}},
        {**chunk, "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]},
        "[DONE]",
    ]


@pytest.mark.parametrize("fmt", [COMPLETION, CHAT])
def test_a_stream_cut_by_shutdown_ends_with_one_openai_error_event_then_done(fmt):
    events = [(0, TokenEvent("a", 5)), (1, TokenEvent("b", 6)), (0, FinishEvent("cancelled", 3, 1, SHUTDOWN)),
              (1, FinishEvent("cancelled", 3, 1, SHUTDOWN))]
    stream = make_stream(fmt, events, n_jobs=2, n=2)
    got = run_chunks(stream)
    error = {"error": {"message": SHUTDOWN, "type": "service_unavailable", "param": None, "code": "shutting_down"}}
    assert got[-2:] == [error, "[DONE]"]
    assert len(got) == (4 if fmt is CHAT else 2) + 2  # (role chunks,) the two tokens, the error, [DONE]
    assert all(job.cancelled for job in stream.jobs)  # the other choice is not decoded for nobody


def test_a_failed_decode_is_a_server_error_event():
    got = run_chunks(make_stream(COMPLETION, [(0, FinishEvent("error", 3, 0, "RuntimeError: boom"))]))
    assert got == [{"error": {"message": "Generation failed: RuntimeError: boom", "type": "server_error",
                              "param": None, "code": "internal_error"}}, "[DONE]"]


def test_collect_builds_the_chat_body_and_counts_each_prompt_once():
    events = [(1, TokenEvent("yo", 4, [0.5, 0.5])), (0, TokenEvent("hey", 3)), (1, FinishEvent("stop", 3, 1)),
              (0, FinishEvent("length", 3, 2))]
    body = run_collect(make_stream(CHAT, events, n_jobs=2, n=2))
    assert body == {**HEAD, "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "hey"}},
        {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "yo"},
         "xlora": {"scalings": [[0.5, 0.5]], "token_ids": [4]}},
    ], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}, "xlora": {"experts": ["a", "b"]}}


def test_collect_of_a_request_cut_by_shutdown_raises_a_503():
    events = [(0, TokenEvent("a", 5)), (0, FinishEvent("cancelled", 3, 1, SHUTDOWN))]
    with pytest.raises(APIError) as err:
        run_collect(make_stream(COMPLETION, events))
    assert (err.value.status, err.value.body()) == (503, {"error": {
        "message": SHUTDOWN, "type": "service_unavailable", "param": None, "code": "shutting_down"}})


def test_the_official_client_raises_on_the_error_event():
    events = [(0, TokenEvent("a", 5)), (0, TokenEvent("b", 6)), (0, FinishEvent("cancelled", 3, 2, SHUTDOWN))]
    sse = "".join(asyncio.run(_all(make_stream(COMPLETION, events).chunks())))
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=sse.encode()))
    client = OpenAI(base_url="http://test/v1", api_key="k", http_client=httpx.Client(transport=transport))
    texts = []
    with pytest.raises(openai.APIError) as err:
        for chunk in client.completions.create(model="m", prompt="x", stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["a", "b"]
    assert (err.value.message, err.value.code, err.value.type) == (SHUTDOWN, "shutting_down", "service_unavailable")


async def _all(gen) -> list[str]:
    return [c async for c in gen]
