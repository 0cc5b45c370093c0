"""The batching worker (xlora.serve.batcher), without HTTP: batched rows equal their solo generate() runs,
greedy or sampled; rows join a running batch; shutdown ends rows at its deadline; failures stay contained."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from xlora.pretrained import load_model_and_tokenizer
from xlora.serve.batcher import (
    NOT_STARTED,
    Batcher,
    BatcherConfig,
    FinishEvent,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    TokenEvent,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def make_batcher(model_dir):
    made = []

    def make(**cfg) -> Batcher:
        model, tok = load_model_and_tokenizer(model_dir)
        made.append(Batcher(model, tok, BatcherConfig(**cfg)))
        return made[-1]

    yield make
    for b in made:
        b.close(timeout=0)


class Row:
    """A job's sink: its token ids, its finish event, and when it came."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.finish: FinishEvent | None = None
        self.finished_at = 0.0
        self.started, self.done = threading.Event(), threading.Event()

    def __call__(self, ev) -> None:
        if isinstance(ev, TokenEvent):
            self.ids.append(ev.token_id)
            self.started.set()
        else:
            self.finish, self.finished_at = ev, time.monotonic()
            self.done.set()


def generate_ids(model, ids: list[int], params: SamplingParams) -> list[int]:
    """``torch.manual_seed(seed); model.generate(**params.generate_kwargs())`` for one prompt, EOS ignored."""
    torch.manual_seed(params.seed or 0)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=params.max_tokens, pad_token_id=0, eos_token_id=None,
                             **params.generate_kwargs())
    return out[0, len(ids):].tolist()


def test_batched_rows_sample_as_generate_does_each_with_its_own_parameters(make_batcher, ref):
    model, tok = ref
    jobs = [("Hello there", SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=30, seed=1)),
            ("Once upon a time", SamplingParams(max_tokens=14, temperature=1.2, min_p=0.05, seed=2)),
            ("x", SamplingParams(max_tokens=9, temperature=0, repetition_penalty=1.4)),
            ("Lorem ipsum", SamplingParams(max_tokens=17, temperature=1.0, repetition_penalty=1.2, seed=3))]
    batcher = make_batcher(max_batch=4, batch_window_ms=500)
    rows = [Row() for _ in jobs]
    for (prompt, params), row in zip(jobs, rows):  # submitted before the worker starts: one batch of four
        params.ignore_eos = True
        batcher.submit(tok(prompt)["input_ids"], params, row)
    batcher.start()
    for row in rows:
        assert row.done.wait(60)
    assert dict(batcher.batch_sizes) == {4: 1}  # decoded together, left-padded
    for (prompt, params), row in zip(jobs, rows):
        assert (row.finish.reason, row.finish.completion_tokens) == ("length", params.max_tokens)
        assert row.ids == generate_ids(model, tok(prompt)["input_ids"], params), prompt


def _greedy_no_cache(model, ids: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence for every token (no cache, no padding, EOS ignored)."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_requests_arriving_mid_batch_join_it_and_equal_their_solo_runs(make_batcher, ref):
    model, tok = ref
    batcher = make_batcher(max_batch=4, batch_window_ms=0)
    batcher.start()
    prompts = ["Once upon a time", "x", "A much longer prompt, so the caches need padding", "mid"]
    lengths = [40, 6, 12, 3]
    rows = [Row() for _ in prompts]

    def submit(i: int) -> None:
        params = SamplingParams(max_tokens=lengths[i], temperature=0, ignore_eos=True)
        batcher.submit(tok(prompts[i])["input_ids"], params, rows[i])

    submit(0)
    assert rows[0].started.wait(30)
    for i in (1, 2, 3):  # while request 0 is decoding
        submit(i)
    for row in rows:
        assert row.done.wait(60)
    for i, row in enumerate(rows):
        assert row.finish.reason == "length"
        assert row.ids == _greedy_no_cache(model, tok(prompts[i])["input_ids"], lengths[i]), i
    assert batcher.joined_rows == 3  # they joined the running batch ...
    assert max(r.finished_at for r in rows[1:]) < rows[0].finished_at  # ... and finished long before request 0


def test_shutdown_ends_running_and_queued_rows_at_the_deadline(make_batcher):
    batcher = make_batcher(max_batch=1, batch_window_ms=0)
    batcher.start()
    long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    running, queued = Row(), Row()
    batcher.submit([5, 6, 7], long, running)
    assert running.started.wait(30)
    batcher.submit([8, 9], long, queued)  # max_batch=1: it waits for the running row
    start = time.monotonic()
    batcher.begin_shutdown(0.3)
    with pytest.raises(ShuttingDown, match="the server is shutting down"):
        batcher.submit([5], long, Row())
    assert running.done.wait(10) and queued.done.wait(10)
    message = ("the server is shutting down and this request did not finish within its shutdown timeout of 0.3 s; "
               "retry it on another instance")
    assert running.finish == FinishEvent("cancelled", 3, len(running.ids), message)
    assert queued.finish == FinishEvent("cancelled", 2, 0, message)
    assert 10 < len(running.ids) < 1000  # it decoded during the grace period, then stopped
    assert 0.3 <= running.finished_at - start < 1.0
    assert batcher.finished == {"stop": 0, "length": 0, "cancelled": 2, "error": 0}
    t = time.monotonic()
    batcher.close(timeout=30)  # the deadline already passed: nothing to wait for
    assert time.monotonic() - t < 1.0 and not batcher._thread.is_alive()


def test_close_lets_running_rows_finish_and_ends_jobs_that_never_started(make_batcher):
    batcher = make_batcher(max_batch=1)
    never = Row()
    batcher.submit([5, 6], SamplingParams(max_tokens=3), never)  # the worker was never started
    batcher.close(timeout=0.1)
    assert never.finish == FinishEvent("cancelled", 2, 0, NOT_STARTED)

    batcher = make_batcher(max_batch=1)
    batcher.start()
    short = Row()
    batcher.submit([5, 6], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), short)
    batcher.close(timeout=30)
    assert short.finish == FinishEvent("length", 2, 5, None) and len(short.ids) == 5


def test_a_failing_forward_fails_its_rows_and_the_worker_goes_on(make_batcher, monkeypatch):
    batcher = make_batcher(max_batch=2, batch_window_ms=0)
    real = batcher.model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the prefill and one decoding step go through, then:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher.model, "forward", forward)
    batcher.start()
    first, second = Row(), Row()
    batcher.submit([5, 6], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), first)
    assert first.done.wait(30)
    assert first.finish == FinishEvent("error", 2, 2, "RuntimeError: boom")
    batcher.submit([5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), second)
    assert second.done.wait(30) and second.finish == FinishEvent("length", 2, 4, None)
    assert second.ids[:2] == first.ids  # the same greedy start: the failure left nothing broken behind
    assert batcher.finished == {"stop": 0, "length": 1, "cancelled": 0, "error": 1}


def test_submit_refuses_empty_prompts_and_a_full_queue(make_batcher):
    batcher = make_batcher(max_queue=1)
    with pytest.raises(ValueError, match="prompt_ids is empty: the prompt must have at least one token"):
        batcher.submit([], SamplingParams(), Row())
    batcher.submit([5], SamplingParams(), Row())
    with pytest.raises(QueueFull) as err:
        batcher.submit([5], SamplingParams(), Row())
    assert str(err.value) == "1 requests are already waiting (max_queue=1)"
    assert batcher.queue_length == 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_batch", 0, "max_batch must be an integer >= 1, got 0"),
    ("batch_window_ms", -1.0, "batch_window_ms must be in [0, 10000], got -1.0; 5-20 is typical"),
    ("max_queue", 0, "max_queue must be an integer >= 1, got 0"),
])
def test_config_errors_name_the_field_and_value(field, value, message):
    with pytest.raises(ValueError) as err:
        BatcherConfig(**{field: value})
    assert str(err.value) == message
