"""Prometheus metrics of the server, in the text exposition format, without extra dependencies.

Requests are counted by ``endpoint`` label: the route of :data:`~xlora.serve.protocol.ENDPOINTS`
that the path matches (``/v1/models/{model_id}`` for any model id), else ``other``, so the label
values stay bounded and a new endpoint needs no change here.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from starlette.routing import compile_path

from xlora.serve.protocol import ENDPOINTS, Endpoint

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """Request counts by endpoint and status, latencies, tokens; queue and batch figures from ``batcher``."""

    def __init__(self, batcher: Any, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> None:
        self.batcher = batcher
        self.routes = [(compile_path(e.path)[0], e.label) for e in endpoints]
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def label(self, path: str) -> str:
        """The ``endpoint`` label of a request path: its route in the endpoint table, else ``other``."""
        return next((label for regex, label in self.routes if regex.match(path)), "other")

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = self.label(path)
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def count_tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self) -> str:
        b = self.batcher
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, rows: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows])

        with self.lock:
            metric("xlora_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [f'xlora_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())])
            metric("xlora_request_duration_seconds", "histogram", "Request latency, to the end of the response.",
                   [line for e, h in sorted(self.latency.items())
                    for line in h.lines("xlora_request_duration_seconds", f'endpoint="{e}"')])
            metric("xlora_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [f"xlora_prompt_tokens_total {self.prompt_tokens}"])
            metric("xlora_completion_tokens_total", "counter", "Tokens returned to clients (finished requests).",
                   [f"xlora_completion_tokens_total {self.completion_tokens}"])
        metric("xlora_generated_tokens_total", "counter", "Tokens sampled by the model, cancelled rows included.",
               [f"xlora_generated_tokens_total {b.generated_tokens}"])
        metric("xlora_finished_total", "counter", "Finished rows by reason (stop, length, cancelled, error).",
               [f'xlora_finished_total{{reason="{r}"}} {n}' for r, n in b.finished.items()])
        metric("xlora_queue_length", "gauge", "Requests waiting for the next batch.",
               [f"xlora_queue_length {b.queue_length}"])
        metric("xlora_active_rows", "gauge", "Rows being decoded in the current batch.",
               [f"xlora_active_rows {b.active_rows}"])
        metric("xlora_joined_rows_total", "counter", "Requests that joined a running batch (continuous batching).",
               [f"xlora_joined_rows_total {b.joined_rows}"])
        hist = Histogram(BATCH_BUCKETS)
        for size, n in sorted(dict(b.batch_sizes).items()):  # a copy: the worker may add a size
            hist.observe(size, n)
        metric("xlora_batch_size", "histogram", "Rows per prefill (a new batch or rows joining one).", hist.lines("xlora_batch_size"))
        return "\n".join(out) + "\n"

    def middleware_class(self) -> type:
        """A pure ASGI middleware recording every HTTP request (streams count until their last byte)."""
        metrics = self

        class RequestMetrics:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    return await self.app(scope, receive, send)
                start, status = time.perf_counter(), 500

                async def send_and_note(message: dict[str, Any]) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                try:
                    await self.app(scope, receive, send_and_note)
                finally:
                    metrics.observe_request(scope["path"], status, time.perf_counter() - start)

        return RequestMetrics
