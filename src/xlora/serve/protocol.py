"""The OpenAI wire format of the server: the endpoint table, request schemas and errors.

Requests follow OpenAI's completions and chat completions; besides OpenAI's sampling fields they
accept ``top_k``, ``min_p`` and ``repetition_penalty`` (vLLM's names, transformers' meanings) and the
extension ``"xlora": {"return_scalings": bool, "ignore_eos": bool}``. Response bodies and stream
chunks are built in :mod:`xlora.serve.responses`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


@dataclass(frozen=True)
class Endpoint:
    """One route: ``handler`` names the :class:`~xlora.serve.service.OpenAIService` method answering
    it; ``label`` is its value of the ``endpoint`` label in the metrics."""

    method: str
    path: str
    handler: str

    @property
    def label(self) -> str:
        return self.path.replace(":path}", "}")


# The one endpoint table: the app's routes and the metrics' endpoint labels are both read from it.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/v1/models", "models"),
    Endpoint("GET", "/v1/models/{model_id:path}", "model_card"),
    Endpoint("POST", "/v1/completions", "completions"),
    Endpoint("POST", "/v1/chat/completions", "chat_completions"),
    Endpoint("GET", "/health", "health"),
    Endpoint("GET", "/metrics", "prometheus"),
)


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
    top_k: int = Field(0, ge=0)  # 0: no top-k (OpenAI has none)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
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


def parse_request(body: bytes, schema: type[CommonRequest]) -> Any:
    """Decode and validate a request body: a 400 for bad JSON or an unsupported option, a 422 for a bad field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"The request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.",
                       code="invalid_json")
    try:
        req = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise APIError(422, f"Invalid value for '{loc}': {first['msg']}.", param=loc, code="invalid_value") from None
    for name, fine in UNSUPPORTED.items():
        if name in data and data[name] not in fine:
            raise APIError(400, f"'{name}'={data[name]!r} is not supported by this server; leave it unset.",
                           param=name, code="unsupported_parameter")
    return req
