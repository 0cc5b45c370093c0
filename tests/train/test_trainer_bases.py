"""Head training on the bases people load: gradient checkpointing, half precision, 8-bit."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import config, head_of, world  # noqa: F401  (world is a fixture)

from xlora.train.trainer import train


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_gradient_checkpointing_trains_the_same_head(world, tmp_path):  # noqa: F811
    for name, ckpt in (("plain", False), ("ckpt", True)):
        train(config(world, tmp_path / name, max_steps=6, log_every=1, gradient_checkpointing=ckpt))
    a, b = head_of(tmp_path / "plain"), head_of(tmp_path / "ckpt")
    assert set(a) == set(b)
    for k in a:  # exact recomputation: the same gradients, so the same Adam steps (float32 rounding only)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), abs=1e-6)


def test_a_bfloat16_base_trains_a_float32_head(world, tmp_path):  # noqa: F811
    train(config(world, tmp_path / "fp32", max_steps=8, log_every=1))
    train(config(world, tmp_path / "bf16", max_steps=8, log_every=1, dtype="bfloat16"))
    assert all(v.dtype == torch.float32 for v in head_of(tmp_path / "bf16").values())
    ref, got = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(got) == 8 and got[-1] < got[0]
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 0.05  # bf16 weights: ~1% per op, the same run


def test_an_8bit_base_trains(world, tmp_path):  # noqa: F811
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install xlora[quant])")
    train(config(world, tmp_path / "int8", max_steps=8, log_every=1, load_in_8bit=True))
    got = losses(tmp_path / "int8")
    assert len(got) == 8 and got[-1] < got[0] - 0.01


def test_bad_base_options_are_refused(world, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="load_in_8bit and load_in_4bit exclude each other"):
        config(world, tmp_path / "x", load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="dtype must be one of .* got 'fp8'"):
        config(world, tmp_path / "x", dtype="fp8")
    assert not (tmp_path / "x").exists()


def test_the_trainer_builds_its_model_with_the_base_options(world, tmp_path):  # noqa: F811
    """What the runs above cannot tell apart from a plain run: the options reach the model."""
    from xlora.train.setup import build_model

    model = build_model(config(world, tmp_path / "p", dtype="bfloat16", gradient_checkpointing=True), None)
    assert {p.dtype for p in model.base_model.parameters()} == {torch.bfloat16}
    assert model.is_activation_checkpointing and all(p.dtype == torch.float32 for p in model.head.parameters())
    assert not build_model(config(world, tmp_path / "q"), None).is_activation_checkpointing
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install xlora[quant])")
    int8 = build_model(config(world, tmp_path / "r", load_in_8bit=True), None)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in int8.base_model.modules())
