"""Prometheus text (xlora.serve.metrics): exact lines, labels read from the one endpoint table."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from xlora.serve.metrics import Histogram, Metrics
from xlora.serve.protocol import ENDPOINTS, Endpoint


def fake_batcher(**kw):
    base = dict(generated_tokens=7, finished={"stop": 1, "length": 2, "cancelled": 3, "error": 0}, queue_length=4,
                active_rows=1, joined_rows=3, batch_sizes=Counter({1: 2, 3: 1}))
    return SimpleNamespace(**{**base, **kw})


def test_histogram_lines_are_cumulative_with_sum_and_count():
    h = Histogram((0.1, 1.0, 5.0))
    h.observe(0.05)
    h.observe(2.0, times=3)
    assert h.lines("x", 'k="v"') == ['x_bucket{k="v",le="0.1"} 1', 'x_bucket{k="v",le="1"} 1',
                                     'x_bucket{k="v",le="5"} 4', 'x_bucket{k="v",le="+Inf"} 4',
                                     'x_sum{k="v"} 6.050000', 'x_count{k="v"} 4']
    assert h.lines("y")[-3:] == ['y_bucket{le="+Inf"} 4', "y_sum 6.050000", "y_count 4"]


def test_labels_come_from_the_endpoint_table_and_stay_bounded():
    m = Metrics(fake_batcher())
    assert [m.label(p) for p in ("/v1/models", "/v1/models/org/tiny", "/v1/completions", "/v1/chat/completions",
                                 "/health", "/metrics", "/v1/embeddings", "/v1/completions/x", "/")] == [
        "/v1/models", "/v1/models/{model_id}", "/v1/completions", "/v1/chat/completions", "/health", "/metrics",
        "other", "other", "other"]
    grown = Metrics(fake_batcher(), (*ENDPOINTS, Endpoint("POST", "/v1/embeddings", "embeddings")))
    assert grown.label("/v1/embeddings") == "/v1/embeddings"  # a new table entry is all a new endpoint needs


def test_render_gives_exact_counters_gauges_and_histograms():
    m = Metrics(fake_batcher())
    m.observe_request("/v1/completions", 200, 0.03)
    m.observe_request("/v1/completions", 400, 0.002)
    m.observe_request("/v1/models/tiny", 404, 0.001)
    m.observe_request("/nowhere", 404, 0.001)
    m.count_tokens(5, 9)
    m.count_tokens(2, 1)
    lines = m.render().splitlines()
    assert [x for x in lines if x.startswith("xlora_requests_total")] == [
        'xlora_requests_total{endpoint="/v1/completions",status="200"} 1',
        'xlora_requests_total{endpoint="/v1/completions",status="400"} 1',
        'xlora_requests_total{endpoint="/v1/models/{model_id}",status="404"} 1',
        'xlora_requests_total{endpoint="other",status="404"} 1']
    completions = [x for x in lines if x.startswith("xlora_request_duration_seconds") and "/v1/completions" in x]
    assert completions[:3] == ['xlora_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.01"} 1',
                               'xlora_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.025"} 1',
                               'xlora_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.05"} 2']
    assert completions[-2:] == ['xlora_request_duration_seconds_sum{endpoint="/v1/completions"} 0.032000',
                                'xlora_request_duration_seconds_count{endpoint="/v1/completions"} 2']
    plain = [x for x in lines if not x.startswith(("#", "xlora_request"))]
    assert plain == [
        "xlora_prompt_tokens_total 7", "xlora_completion_tokens_total 10", "xlora_generated_tokens_total 7",
        'xlora_finished_total{reason="stop"} 1', 'xlora_finished_total{reason="length"} 2',
        'xlora_finished_total{reason="cancelled"} 3', 'xlora_finished_total{reason="error"} 0',
        "xlora_queue_length 4", "xlora_active_rows 1", "xlora_joined_rows_total 3",
        'xlora_batch_size_bucket{le="1"} 2', 'xlora_batch_size_bucket{le="2"} 2', 'xlora_batch_size_bucket{le="4"} 3',
        'xlora_batch_size_bucket{le="8"} 3', 'xlora_batch_size_bucket{le="16"} 3', 'xlora_batch_size_bucket{le="32"} 3',
        'xlora_batch_size_bucket{le="64"} 3', 'xlora_batch_size_bucket{le="128"} 3',
        'xlora_batch_size_bucket{le="+Inf"} 3', "xlora_batch_size_sum 5.000000", "xlora_batch_size_count 3"]
    types = [x for x in lines if x.startswith("# TYPE")]
    assert len(types) == 10 and "# TYPE xlora_queue_length gauge" in types


def test_the_middleware_counts_every_request_by_route_and_status():
    m = Metrics(fake_batcher())

    async def ok(request):
        return PlainTextResponse("ok")

    async def boom(request):
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/health", ok), Route("/v1/models/{model_id:path}", ok),
                            Route("/v1/completions", boom, methods=["POST"])])
    app.add_middleware(m.middleware_class())
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/health", "/health", "/v1/models/a/b", "/missing"):
            client.get(path)
        assert client.post("/v1/completions").status_code == 500
    assert dict(m.requests) == {("/health", 200): 2, ("/v1/models/{model_id}", 200): 1, ("other", 404): 1,
                                ("/v1/completions", 500): 1}
    assert sum(h.count for h in m.latency.values()) == 5
