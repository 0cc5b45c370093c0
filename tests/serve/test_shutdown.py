"""SIGTERM to a real `xlora serve` process while long requests run: each gets a well-formed OpenAI error
at the shutdown timeout (never a cut connection or a plain-text 500), and the process exits soon after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import free_port
from openai import OpenAI
from serve_models import build_model_dir, long_context_base, wait_healthy

NAME = "tiny-xlora"
TIMEOUT_S = 2.0
LONG = {"model": NAME, "prompt": "Hi", "max_tokens": 30000, "temperature": 0, "xlora": {"ignore_eos": True}}



@pytest.fixture
def server(tmp_path_factory, tmp_path):
    model_dir = build_model_dir(tmp_path_factory)
    base = long_context_base(model_dir, tmp_path / "base")  # 32k positions: the streams outlast the timeout
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xlora", "serve", str(model_dir), "--base", str(base), "--host", "127.0.0.1",
         "--port", str(port), "--model-name", NAME, "--shutdown-timeout", str(TIMEOUT_S),
         "--max-tokens-limit", "30000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 90)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_ends_long_requests_with_openai_errors_and_exits(server):
    proc, url = server
    got: dict[str, object] = {}
    first_chunk = threading.Event()

    def raw_stream() -> None:  # the bytes on the wire
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append((time.monotonic(), line))
                    first_chunk.set()
        got["stream"] = lines

    def plain() -> None:
        resp = httpx.post(url + "/v1/completions", json=LONG, timeout=60)
        got["plain"] = (time.monotonic(), resp.status_code, resp.json())

    def client_stream() -> None:  # what the official client makes of it
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        texts = []
        try:
            args = {k: v for k, v in LONG.items() if k != "xlora"}
            for chunk in client.completions.create(**args, stream=True, extra_body={"xlora": LONG["xlora"]}):
                texts.append(chunk.choices[0].text)
        except openai.APIError as err:
            got["client"] = (len(texts), err)

    threads = [threading.Thread(target=f) for f in (raw_stream, plain, client_stream)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").json()["active"] < 3 or not first_chunk.is_set():
        assert time.monotonic() < deadline, "the three requests did not start"
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=TIMEOUT_S + 10)
    exited = time.monotonic() - sent
    for t in threads:
        t.join(10)
    stderr = proc.stderr.read()

    assert exited < TIMEOUT_S + 5, exited
    assert rc == -signal.SIGTERM, stderr  # uvicorn re-raises the signal once shut down, as an unhandled one would
    assert "timeout graceful shutdown exceeded" not in stderr, stderr  # uvicorn never had to cancel a request
    assert "Exception in ASGI application" not in stderr, stderr
    error = {"message": f"the server is shutting down and this request did not finish within its shutdown "
                        f"timeout of {TIMEOUT_S:g} s; retry it on another instance",
             "type": "service_unavailable", "param": None, "code": "shutting_down"}

    lines = got["stream"]
    assert [line for _, line in lines[-2:]] == [f"data: {json.dumps({'error': error})}", "data: [DONE]"]
    chunks = [json.loads(line[6:]) for _, line in lines[:-2]]
    assert len(chunks) > 20 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert TIMEOUT_S - 0.1 <= lines[-2][0] - sent < TIMEOUT_S + 2  # it ran for the whole grace period, no longer

    at, status, body = got["plain"]
    assert (status, body) == (503, {"error": error})
    assert TIMEOUT_S - 0.1 <= at - sent < TIMEOUT_S + 2

    n_texts, err = got["client"]
    assert n_texts > 20 and err.code == "shutting_down" and err.message == error["message"]
