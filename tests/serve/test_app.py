"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and httpx."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from fastapi.routing import APIRoute
from openai import OpenAI
from serve_models import EXPERTS, at_once

from xlora.pretrained import load_model_and_tokenizer
from xlora.serve.app import ServerConfig, build_server, create_app
from xlora.serve.protocol import ENDPOINTS

KEY = "sk-test-key"
NAME = "tiny-xlora"
PROMPTS = ["Hello", "The quick brown fox", "a", "What is 2+2?", "xyz", "Once upon a time", "!", "Lorem ipsum dolor"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Live:
    def __init__(self, model_dir, **cfg) -> None:
        model, tok = load_model_and_tokenizer(model_dir)
        self.app = create_app(model, tok, ServerConfig(model_name=NAME, api_key=KEY, **cfg))
        self.batcher = self.app.state.batcher
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = build_server(self.app, log_level="warning", shutdown_timeout_s=20)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.http.close()

    def metric(self, line_prefix: str) -> float:
        text = self.http.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.batcher.active_rows or self.batcher.queue_length:
            assert time.monotonic() < deadline, "the server did not become idle"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def live(model_dir):
    server = Live(model_dir, max_batch=8, batch_window_ms=20)
    yield server
    server.stop()


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if chat:
        return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])
    return tok(prompt)["input_ids"]


@cache
def _solo(ref_id: int, ids: tuple[int, ...], n: int) -> tuple[list[int], str]:
    model, tok = _REFS[ref_id]
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


_REFS: dict[int, tuple] = {}


def expected(ref, prompt: str, n: int, chat: bool = False) -> tuple[list[int], str]:
    """``model.generate(do_sample=False)`` on this prompt alone: (new ids, text)."""
    _REFS[id(ref)] = ref
    return _solo(id(ref), tuple(prompt_ids(ref[1], prompt, chat)), n)


def ask(live: Live, prompt: str, n: int, chat: bool, stream: bool, **kw):
    """One request through the openai client: (text, finish_reason, usage or None, raw choices/chunks)."""
    c = live.client
    if chat:
        resp = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                         temperature=0, stream=stream, **kw)
    else:
        resp = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=stream, **kw)
    if not stream:
        choice = resp.choices[0]
        return (choice.message.content if chat else choice.text), choice.finish_reason, resp.usage, [resp]
    chunks = list(resp)
    pieces = [(ch.choices[0].delta.content or "") if chat else ch.choices[0].text for ch in chunks if ch.choices]
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1
    return "".join(pieces), finish[0], None, chunks


def test_models_and_health(live):
    routes = {(m, r.path) for r in live.app.routes if isinstance(r, APIRoute) for m in r.methods}
    assert routes == {(e.method, e.path) for e in ENDPOINTS}  # the routes are the endpoint table
    assert [m.id for m in live.client.models.list().data] == [NAME]
    assert live.client.models.retrieve(NAME).model_extra["xlora"] == {"experts": EXPERTS}
    health = httpx.get(live.url + "/health").json()
    assert health == {"status": "ok", "queue_length": 0, "active": 0}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_text_equals_generate(live, ref, chat, stream):
    for prompt, n in [("Hello", 12), ("The quick brown fox", 20)]:
        new, text = expected(ref, prompt, n, chat)
        got, finish, usage, _ = ask(live, prompt, n, chat, stream)
        assert got == text
        assert finish == ("length" if len(new) == n else "stop")
        if usage is not None:
            assert usage.completion_tokens == len(new)
            assert usage.prompt_tokens == len(prompt_ids(ref[1], prompt, chat))


def test_sixteen_concurrent_streams_each_equal_their_solo_run(live, ref):
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + i, i % 2 == 1) for i in range(16)]
    want = [expected(ref, p, n, chat)[1] for p, n, chat in jobs]
    batches_before = live.metric("xlora_batch_size_count")
    got = at_once([lambda job=job: ask(live, *job, stream=True)[0] for job in jobs], 60)
    assert got == want
    batches = live.metric("xlora_batch_size_count") - batches_before
    assert batches < len(jobs)  # requests really were decoded together (max_batch 8: at least 2 batches)
    live.wait_idle()


def _error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live, ref):
    h = live.http
    ok = {"model": NAME, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    _error(h.post("/v1/completions", content=b'{"model": "x", "prompt": ', headers=headers), 400, code="invalid_json")
    _error(h.post("/v1/completions", json={**ok, "model": "gpt-4"}), 404, "model", "model_not_found")
    _error(h.post("/v1/completions", json={**ok, "max_tokens": -5}), 422, "max_tokens")
    _error(h.post("/v1/completions", json={**ok, "max_tokens": 10**9}), 400, "max_tokens")
    _error(h.post("/v1/completions", json={**ok, "max_tokens": 1000, "prompt": "x" * 100}), 400, "max_tokens",
           "context_length_exceeded")
    _error(h.post("/v1/completions", json={**ok, "prompt": "x" * 2000}), 400, "prompt", "context_length_exceeded")
    _error(h.post("/v1/completions", json={**ok, "temperature": "hot"}), 422, "temperature")
    _error(h.post("/v1/completions", json={**ok, "logprobs": 3}), 400, "logprobs", "unsupported_parameter")
    _error(h.post("/v1/completions", json={**ok, "xlora": {"bogus": 1}}), 422, "xlora.bogus")
    _error(h.post("/v1/chat/completions", json={"model": NAME, "max_tokens": 3}), 422, "messages")
    _error(h.post("/v1/chat/completions", json={"model": NAME, "messages": []}), 422, "messages")
    _error(h.post("/v1/completions", content=json.dumps({**ok, "prompt": "x" * (2 << 20)}), headers=headers), 413)
    assert _error(httpx.post(live.url + "/v1/completions", json=ok), 401)["type"] == "authentication_error"
    _error(httpx.post(live.url + "/v1/completions", json=ok, headers={"Authorization": "Bearer sk-wrong"}), 401,
           code="invalid_api_key")
    _error(httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
    _error(h.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
    _error(h.get("/v1/nowhere"), 404)
    _error(h.get("/v1/completions"), 405)
    # the official client maps them to its exceptions
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=live.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as exc:
        live.client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert exc.value.code == "model_not_found"
    # still serving, and still right
    assert ask(live, "Hello", 12, chat=False, stream=False)[0] == expected(ref, "Hello", 12)[1]
    counted = live.metric('xlora_requests_total{endpoint="/v1/completions",status="4')
    assert counted >= 11


@pytest.mark.parametrize("stream", [False, True])
def test_return_scalings_equal_a_direct_forward(live, ref, stream):
    model, tok = ref
    prompt, n = "The quick brown fox", 9
    _, text, = expected(ref, prompt, n)
    got, _, _, raw = ask(live, prompt, n, chat=False, stream=stream, extra_body={"xlora": {"return_scalings": True}})
    assert got == text
    scalings, ids = [], []
    for item in raw:
        ext = item.choices[0].model_extra.get("xlora") if item.choices else None
        if ext:
            assert item.model_extra["xlora"]["experts"] == EXPERTS
            scalings += ext["scalings"]
            ids += ext["token_ids"]
    s = torch.tensor(scalings)
    assert s.shape == (n, len(EXPERTS))
    torch.testing.assert_close(s.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    full = prompt_ids(tok, prompt, chat=False) + ids
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([full[:-1]]))
    direct = out.scalings[0, len(full) - n - 1:].float().mean(1)  # [n, E]: the step that produced each token
    torch.testing.assert_close(s, direct, rtol=0, atol=1e-5)
    assert ids == expected(ref, prompt, n)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_trimmed_and_seeds_reproduce(live, ref, stream):
    _, text = expected(ref, "Once upon a time", 24)
    stop = text[5:8]  # three characters: three tokens of the char tokenizer, so the stream must hold back
    got, finish, _, _ = ask(live, "Once upon a time", 24, chat=False, stream=stream, stop=[stop, "never-seen"])
    assert (got, finish) == (text[: text.index(stop)], "stop")
    c = live.client
    sample = dict(model=NAME, prompt="Hello", max_tokens=16, temperature=1.5, top_p=0.9, seed=7)
    first = c.completions.create(**sample, n=2)
    again = c.completions.create(**sample, n=2)
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]
    assert first.choices[0].text != first.choices[1].text  # each choice has its own generator (seed + index)


def test_seeded_sampling_equals_generate_token_for_token(live, ref):
    """The request's sampling fields are generate()'s: with the same seed, the same tokens (n=2: seeds 7 and 8)."""
    model, tok = ref
    ids = prompt_ids(tok, "Hello", chat=False)
    sample = dict(temperature=0.8, top_p=0.9)
    resp = live.client.completions.create(model=NAME, prompt="Hello", max_tokens=24, seed=7, n=2, **sample,
                                          extra_body={"top_k": 40, "xlora": {"return_scalings": True,
                                                                              "ignore_eos": True}})
    for k, choice in enumerate(resp.choices):
        torch.manual_seed(7 + k)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=True, top_k=40,
                                 pad_token_id=0, eos_token_id=None, **sample)
        assert choice.model_extra["xlora"]["token_ids"] == out[0, len(ids):].tolist()
    assert resp.choices[0].text != resp.choices[1].text


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_row(live, stream):
    cancelled = live.metric('xlora_finished_total{reason="cancelled"}')
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 900, "temperature": 0, "stream": stream,
            "xlora": {"ignore_eos": True}}
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as h:
        if stream:
            with h.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"id"')
                assert live.batcher.active_rows == 1
        else:  # a plain socket: send the request, wait until its row decodes, hang up
            raw = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw)
                             + raw)
                deadline = time.monotonic() + 10
                while live.batcher.active_rows != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
    live.wait_idle(timeout=5)
    assert live.metric('xlora_finished_total{reason="cancelled"}') == cancelled + 1
    assert live.metric("xlora_active_rows") == 0 and live.metric("xlora_queue_length") == 0


def test_queue_full_is_429_and_shutdown_finishes_in_flight_streams(model_dir):
    srv = Live(model_dir, max_batch=1, max_queue=1)
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 300, "temperature": 0, "stream": True,
            "xlora": {"ignore_eos": True}}
    results: dict[str, list[str]] = {}

    def stream(name: str, started: threading.Event) -> None:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
            with h.stream("POST", "/v1/completions", json=body) as resp:
                results[name] = []
                for line in resp.iter_lines():
                    started.set()
                    if line.startswith("data: "):
                        results[name].append(line[6:])

    a_started, b_started = threading.Event(), threading.Event()
    a = threading.Thread(target=stream, args=("a", a_started))
    a.start()
    assert a_started.wait(10) and srv.batcher.active_rows == 1
    b = threading.Thread(target=stream, args=("b", b_started))
    b.start()
    deadline = time.monotonic() + 10
    while srv.batcher.queue_length < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _error(srv.http.post("/v1/completions", json={**body, "stream": False}), 429, code="queue_full")
    srv.batcher.begin_shutdown()  # what the exit signal does first
    _error(srv.http.post("/v1/completions", json={**body, "stream": False}), 503, code="shutting_down")
    assert srv.http.get("/health").status_code == 503
    srv.stop()  # waits for the in-flight streams: the running one and the queued one both complete
    a.join(30)
    b.join(30)
    for name in "ab":
        events = results[name]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not srv.thread.is_alive()


def test_a_second_exit_signal_ends_running_requests_at_once(model_dir):
    srv = Live(model_dir)  # shutdown timeout 20 s
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 900, "temperature": 0, "stream": True,
            "xlora": {"ignore_eos": True}}
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
            with h.stream("POST", "/v1/completions", json=body) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(10)
    srv.server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM: 20 s of grace begin
    time.sleep(0.2)
    assert srv.batcher.active_rows == 1 and not srv.batcher.accepting  # still decoding within the grace period
    sent = time.monotonic()
    srv.server.handle_exit(signal.SIGTERM, None)  # the second signal: no more grace
    reader.join(10)
    srv.thread.join(10)
    assert time.monotonic() - sent < 2 and not srv.thread.is_alive()
    data = [line for line in lines if line]
    assert json.loads(data[-2][6:]) == {"error": {
        "message": "the server is shutting down and this request did not finish within its shutdown timeout of 0 s; "
                   "retry it on another instance", "type": "service_unavailable", "param": None,
        "code": "shutting_down"}}
    assert data[-1] == "data: [DONE]" and len(data) > 10
    srv.http.close()


def test_cli_serve_builds_the_config_from_flags_and_env(monkeypatch, tmp_path, capsys):
    import xlora.serve.app
    from xlora.cli import main

    seen = {}
    monkeypatch.setattr(xlora.serve.app, "serve", lambda d, cfg, base_model=None, log_level="info", **kw: seen.update(
        dir=d, cfg=cfg, base=base_model, base_kwargs=kw))
    monkeypatch.setenv("XLORA_API_KEY", "sk-env")
    assert main(["serve", str(tmp_path / "my-model"), "--max-batch", "4", "--port", "9001",
                 "--shutdown-timeout", "2.5"]) == 0
    cfg = seen["cfg"]
    assert (cfg.model_name, cfg.api_key, cfg.max_batch, cfg.port) == ("my-model", "sk-env", 4, 9001)
    assert cfg.shutdown_timeout_s == 2.5
    assert (cfg.host, cfg.batch_window_ms) == (ServerConfig.host, ServerConfig.batch_window_ms)  # one source of truth
    assert main(["serve", str(tmp_path)]) == 0 and seen["cfg"].shutdown_timeout_s == ServerConfig.shutdown_timeout_s
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, naming the flag and the value
        main(["serve", str(tmp_path), "--shutdown-timeout", "-1"])
    assert exc.value.code == 2
    assert "--shutdown-timeout: expected a number >= 0, got '-1'" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--shutdown-timeout", "inf"]) == 2
    assert "shutdown_timeout_s must be a number of seconds >= 0, got inf" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--api-key", "sk-flag", "--max-batch", "0"]) == 2  # ValueError -> exit 2
    monkeypatch.delenv("XLORA_API_KEY")
    assert main(["serve", str(tmp_path)]) == 0 and seen["cfg"].api_key is None
    assert seen["base_kwargs"] == {}
    assert main(["serve", str(tmp_path), "--dtype", "bfloat16"]) == 0
    assert seen["base_kwargs"] == {"dtype": torch.bfloat16}


def test_the_served_path_is_an_alias_of_the_model_id(model_dir, ref, monkeypatch):
    """The README's client sends model="MY_XLORA_DIR": the path `xlora serve` was given (relative, with or
    without a trailing slash, or absolute) names the model as well as its id does; any other name is a 404."""
    from fastapi.testclient import TestClient

    import xlora.serve.app

    cfg = ServerConfig(model_name="tiny", api_key=KEY).serving("runs/xl/")
    assert cfg.model_aliases == ("runs/xl/", "runs/xl", str(Path("runs/xl").resolve()))
    assert ServerConfig(model_name="xl").serving("xl").model_aliases == (str(Path("xl").resolve()),)
    with pytest.raises(ValueError, match="model_aliases must be a tuple of non-empty strings, got 'a'"):
        ServerConfig(model_aliases="a")
    apps = []
    monkeypatch.setattr(xlora.serve.app, "build_server", lambda app, *a, **kw: SimpleNamespace(run=lambda: apps.append(app)))
    monkeypatch.chdir(model_dir.parent.parent)
    given = f"{model_dir.parent.name}/{model_dir.name}/"  # relative, as typed after `xlora serve`
    xlora.serve.app.serve(given, ServerConfig(model_name="tiny", api_key=KEY))
    want = expected(ref, "Hello", 4)[1]
    with TestClient(apps[0]) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        for name in ("tiny", given, given.rstrip("/"), str(model_dir.resolve())):
            resp = client.completions.create(model=name, prompt="Hello", max_tokens=4, temperature=0)
            assert (resp.model, resp.choices[0].text) == ("tiny", want), name
        with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist; this server serves 'tiny'"):
            client.completions.create(model="nope", prompt="Hello", max_tokens=4)
