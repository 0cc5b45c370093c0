"""The wire format (xlora.serve.protocol): exact error bodies, request parsing, and the one endpoint table."""

from __future__ import annotations

import json

import pytest

from xlora.serve.protocol import ENDPOINTS, APIError, ChatRequest, CompletionRequest, parse_request
from xlora.serve.service import OpenAIService


def error_of(body: bytes | str, schema=CompletionRequest) -> tuple[int, dict]:
    with pytest.raises(APIError) as err:
        parse_request(body.encode() if isinstance(body, str) else body, schema)
    return err.value.status, err.value.body()["error"]


def test_api_error_bodies_follow_openai():
    assert APIError(429, "slow down", code="queue_full").body() == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
    types = {s: APIError(s, "x").body()["error"]["type"] for s in (400, 401, 404, 413, 422, 429, 500, 503, 418)}
    assert types == {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                     500: "server_error", 503: "service_unavailable", 418: "server_error"}


def test_bad_bodies_are_400_or_422_naming_the_field():
    status, err = error_of('{"model": "m", "prompt": ')
    assert status == 400 and err["code"] == "invalid_json"
    assert err["message"].startswith("The request body is not valid JSON: Expecting value: line 1 column 26")
    assert error_of("[1, 2]") == (400, {"message": "The request body must be a JSON object, got list.",
                                        "type": "invalid_request_error", "param": None, "code": "invalid_json"})
    assert error_of(b"\xff\xfe")[1]["code"] == "invalid_json"
    assert error_of('{"model": "m", "prompt": "x", "top_p": 1.5}') == (422, {
        "message": "Invalid value for 'top_p': Input should be less than or equal to 1.",
        "type": "invalid_request_error", "param": "top_p", "code": "invalid_value"})
    assert error_of('{"model": "m", "prompt": "x", "top_k": -1}')[1]["param"] == "top_k"
    assert error_of('{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', ChatRequest)[1]["param"] \
        == "messages.0.role"
    assert error_of('{"model": "m", "prompt": "x", "presence_penalty": 0.5}') == (400, {
        "message": "'presence_penalty'=0.5 is not supported by this server; leave it unset.",
        "type": "invalid_request_error", "param": "presence_penalty", "code": "unsupported_parameter"})


def test_valid_bodies_parse_with_defaults_and_nulls_mean_defaults():
    req = parse_request(json.dumps({"model": "m", "prompt": [1, 2], "top_p": None, "presence_penalty": 0,
                                    "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "user": "ignored"}).encode(),
                        CompletionRequest)
    assert (req.prompt, req.temperature, req.top_p, req.top_k, req.min_p, req.repetition_penalty, req.n) == (
        [1, 2], 1.0, 1.0, 40, 0.05, 1.1, 1)
    chat = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}',
                         ChatRequest)
    assert chat.messages[0].content[0].text == "hi" and chat.max_completion_tokens is None


def test_one_endpoint_table_names_the_routes_their_handlers_and_metric_labels():
    assert [(e.method, e.path, e.label) for e in ENDPOINTS] == [
        ("GET", "/v1/models", "/v1/models"),
        ("GET", "/v1/models/{model_id:path}", "/v1/models/{model_id}"),
        ("POST", "/v1/completions", "/v1/completions"),
        ("POST", "/v1/chat/completions", "/v1/chat/completions"),
        ("GET", "/health", "/health"),
        ("GET", "/metrics", "/metrics"),
    ]
    assert all(callable(getattr(OpenAIService, e.handler, None)) for e in ENDPOINTS)
