"""The server's sampler (xlora.serve.sampling) is generate()'s: the same processed scores, the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from xlora.serve.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, top_k=20, seed=3),
    SamplingParams(max_tokens=24, temperature=1.3, min_p=0.05, seed=4),
    SamplingParams(max_tokens=24, temperature=1.0, repetition_penalty=1.3, seed=5),
    SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.5),
]


def generate_reference(model, ids: list[int], params: SamplingParams):
    """``torch.manual_seed(seed); model.generate(**params.generate_kwargs())``, EOS ignored, scores kept."""
    torch.manual_seed(params.seed or 0)
    with torch.inference_mode():
        return model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=params.max_tokens, pad_token_id=0, eos_token_id=None,
                              output_scores=True, output_logits=True, return_dict_in_generate=True,
                              **params.generate_kwargs())


@pytest.mark.parametrize("params", CASES, ids=["T-topk-topp", "T-minp", "penalty", "greedy-penalty"])
def test_scores_and_tokens_equal_generate(ref, params):
    model, tok = ref
    ids = tok("Hello there")["input_ids"]
    out = generate_reference(model, ids, params)
    want = out.sequences[0, len(ids):].tolist()
    sampler = Sampler(params, ids, "cpu")
    got = []
    for raw, processed in zip(out.logits, out.scores, strict=True):  # generate's raw logits and its processed scores
        assert torch.equal(sampler.scores(raw), processed)  # bit for bit, every step
        got.append(sampler(raw))
    assert got == want and len(got) == params.max_tokens
    if params.repetition_penalty != 1.0:
        assert len(set(got)) > 12  # the penalty (over prompt + answer) was really at work


def test_each_row_draws_from_its_own_generator_and_leaves_the_global_one_alone():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11)
    a, b = Sampler(params, [1], "cpu"), Sampler(params, [1], "cpu")
    state = torch.random.get_rng_state()
    first = [a(logits) for _ in range(20)]
    interleaved = [(b(logits), torch.rand(1))[0] for _ in range(20)]  # draws from the global RNG in between
    assert first == interleaved
    torch.manual_seed(11)  # the same stream as generate() would draw from the global generator seeded with 11
    assert first == [int(torch.multinomial(torch.softmax(logits, -1), 1)) for _ in range(20)]
    torch.random.set_rng_state(state)
    assert len(set(first)) > 5


def test_processors_follow_generate_order_and_kwargs():
    p = SamplingParams(temperature=0.5, top_k=7, top_p=0.8, min_p=0.1, repetition_penalty=1.2)
    assert [type(x) for x in p.processors()] == [RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                 TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper]
    assert p.generate_kwargs() == {"do_sample": True, "repetition_penalty": 1.2, "temperature": 0.5, "top_k": 7,
                                   "top_p": 0.8, "min_p": 0.1}
    assert SamplingParams().processors() == []  # temperature 1, no top-k/top-p: plain softmax sampling
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3)
    assert greedy.processors() == [] and greedy.generate_kwargs() == {"do_sample": False, "repetition_penalty": 1.0}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_tokens", 0, "max_tokens=0 is invalid: pass an integer >= 1"),
    ("temperature", -0.5, "temperature=-0.5 is invalid: pass a number >= 0 (0 = greedy)"),
    ("temperature", float("nan"), "temperature=nan is invalid: pass a number >= 0 (0 = greedy)"),
    ("top_p", 0.0, "top_p=0.0 is invalid: pass a number in (0, 1]"),
    ("top_k", -1, "top_k=-1 is invalid: pass an integer >= 0 (0 = no top-k)"),
    ("min_p", 1.5, "min_p=1.5 is invalid: pass a number in [0, 1] or None"),
    ("repetition_penalty", 0, "repetition_penalty=0 is invalid: pass a number > 0 (1 = no penalty)"),
    ("stop", ("ok", ""), "stop=('ok', '') is invalid: pass non-empty strings"),
])
def test_invalid_params_name_field_value_and_fix(field, value, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert str(err.value) == message
