"""The scalings log: a bit-exact file round trip, and an observer of forward and generate."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_head

from xlora import XLoraConfig, XLoraModel
from xlora.analysis import ScalingsLog

NAMES = ["alpha", "beta", "gamma"]
LAYERS = ["m.l0.q", "m.l1.q"]


def test_log_saves_and_reloads_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    log = ScalingsLog(NAMES, LAYERS, info={"prompt": "héllo", "n": [1, 2]})
    log.record(torch.rand(2, 5, 2, 3, generator=g).to(torch.bfloat16), torch.randint(0, 99, (2, 5), generator=g),
               torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    log.record(torch.rand(2, 1, 2, 3, generator=g), torch.randint(0, 99, (2, 7), generator=g),
               torch.ones(2, 7, dtype=torch.long))  # the mask and ids cover the past: the last column is kept
    log.record(torch.rand(1, 3, 2, 3, generator=g, dtype=torch.float64).expand(2, 3, 2, 3))  # no ids, a view
    path = log.save(tmp_path / "sub" / "log.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["log.safetensors"]  # no temporary file left
    back = ScalingsLog.load(path)
    assert (back.expert_names, back.layer_names, back.info) == (NAMES, LAYERS, {"prompt": "héllo", "n": [1, 2]})
    assert len(back) == 3
    for a, b in zip(log.entries, back.entries):
        assert a.scalings.dtype == b.scalings.dtype and torch.equal(a.scalings, b.scalings)
        for k in ("input_ids", "attention_mask"):
            x, y = getattr(a, k), getattr(b, k)
            assert (x is None and y is None) or torch.equal(x, y)
    assert back.entries[1].input_ids.shape == (2, 1)
    ids, rows = back.sequence(0)  # padding dropped: 3 + 1 + 3 rows
    assert rows.shape == (7, 2, 3) and ids[:4].tolist() == log.entries[0].input_ids[0, 2:].tolist() + \
        log.entries[1].input_ids[0].tolist() and ids[4:].tolist() == [-1] * 3
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a scalings log written by ScalingsLog.save"):
        ScalingsLog.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"do not fit this log's \[b, t, L=2, E=3\]"):
        log.record(torch.rand(1, 2, 2, 4))


def build(setup, seed: int = 3) -> XLoraModel:
    config = XLoraConfig(experts={k: str(v) for k, v in setup.expert_dirs.items()}, head_hidden_size=16)
    model = XLoraModel(setup.base(), config).eval()
    randomize_head(model, seed, 0.7)
    return model


@torch.no_grad()
def test_a_log_observing_generate_holds_the_scalings_of_the_tokens_read(llama):
    model = build(llama)
    ids = torch.tensor([[5, 9, 17, 33, 60]])
    log = ScalingsLog.for_model(model)
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, observer=log, pad_token_id=0,
                         eos_token_id=None)
    assert [e.scalings.shape[1] for e in log.entries] == [5, 1, 1, 1, 1, 1]
    seq_ids, rows = log.sequence(0)
    assert seq_ids.tolist() == out[0, :-1].tolist()  # every token but the last was read
    full = model(input_ids=out[:, :-1]).scalings[0]  # recomputing the whole sequence
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-5)


def test_the_observer_is_passed_explicitly_and_sees_forward_and_generate(llama):
    model = build(llama)
    ids = torch.tensor([[5, 9, 17]])
    log = ScalingsLog.for_model(model)
    with torch.no_grad():
        out = model(input_ids=ids, observer=log)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                       observer=log)
        model(input_ids=ids)  # no observer: nothing recorded, and the model keeps no reference to the log
    assert not hasattr(model, "scalings_log") and not hasattr(model, "_last_cache")
    assert [e.scalings.shape[1] for e in log.entries] == [3, 3, 1, 1]
    assert torch.equal(log.entries[0].scalings, out.scalings) and torch.equal(log.entries[0].input_ids, ids)
