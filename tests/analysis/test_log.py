"""Scalings log, statistics worked out by hand, plots (PNG size and labels), and `xlora inspect`."""

from __future__ import annotations

import io
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import randomize_head, tiny_tokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.analysis import (
    ScalingsLog,
    compare,
    expert_stats,
    mixture_summary,
    token_entropy,
    topk_coverage,
)
from xlora.analysis.plots import display_token, generation_share_plot, layer_expert_heatmap, token_expert_heatmap
from xlora.cli import main
from xlora.generation import StepRecorder

NAMES = ["alpha", "beta", "gamma"]
LAYERS = ["m.l0.q", "m.l1.q"]


def hand_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """b=1, t=3 (the last token is padding), L=2, E=3."""
    s = torch.tensor([[
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],    # token 0: layer mean [0.3, 0.45, 0.25] -> beta
        [[0.2, 0.2, 0.6], [0.45, 0.35, 0.2]],  # token 1: layer mean [0.325, 0.275, 0.4] -> gamma
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],    # padding: must not count
    ]])
    return s, torch.tensor([[1, 1, 0]])


def test_expert_stats_equal_hand_computed_values():
    s, mask = hand_tensor()
    st = expert_stats(s, NAMES, LAYERS, mask=mask)
    assert st.num_tokens == 2
    # mean over 2 tokens of the layer means: ([0.3, 0.45, 0.25] + [0.325, 0.275, 0.4]) / 2
    assert st.mean_weight == pytest.approx({"alpha": 0.3125, "beta": 0.3625, "gamma": 0.325})
    assert st.dominant_share == pytest.approx({"alpha": 0.0, "beta": 0.5, "gamma": 0.5})
    # layer 0: ([0.5, 0.3, 0.2] + [0.2, 0.2, 0.6]) / 2; argmax alpha then gamma
    # layer 1: ([0.1, 0.6, 0.3] + [0.45, 0.35, 0.2]) / 2; argmax beta then alpha
    assert st.layer_mean_weight["m.l0.q"] == pytest.approx({"alpha": 0.35, "beta": 0.25, "gamma": 0.4})
    assert st.layer_mean_weight["m.l1.q"] == pytest.approx({"alpha": 0.275, "beta": 0.475, "gamma": 0.25})
    assert st.layer_dominant_share["m.l0.q"] == pytest.approx({"alpha": 0.5, "beta": 0.0, "gamma": 0.5})
    assert st.layer_dominant_share["m.l1.q"] == pytest.approx({"alpha": 0.5, "beta": 0.5, "gamma": 0.0})
    # without the mask the padding token (all alpha) counts: alpha mean (0.3 + 0.325 + 1) / 3
    assert expert_stats(s, NAMES, LAYERS).mean_weight["alpha"] == pytest.approx(1.625 / 3)
    # [t, L, E] works as a batch of one
    assert expert_stats(s[0, :2], NAMES, LAYERS) == st
    assert list(expert_stats(s).mean_weight) == ["expert0", "expert1", "expert2"]


def test_entropy_and_topk_coverage_equal_hand_computed_values():
    s = torch.tensor([[
        [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],          # H = (ln 2 + 0) / 2; top-1 (0.5 + 1) / 2; top-2 1
        [[1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]],  # H = ln 3; top-1 1/3; top-2 2/3
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],          # padding
    ]])
    mask = torch.tensor([[1, 1, 0]])
    h = token_entropy(s)
    assert h.shape == (1, 3)
    torch.testing.assert_close(h[0, :2], torch.tensor([math.log(2) / 2, math.log(3)], dtype=torch.float64))
    torch.testing.assert_close(topk_coverage(s, 1)[0, :2], torch.tensor([0.75, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(topk_coverage(s, 2)[0, :2], torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    m = mixture_summary(s, mask, ks=(1, 2, 3))
    assert m.num_tokens == 2
    assert m.mean_entropy == pytest.approx((math.log(2) / 2 + math.log(3)) / 2)
    assert m.normalized_entropy == pytest.approx((math.log(2) / 2 + math.log(3)) / 2 / math.log(3))
    assert m.topk_coverage == pytest.approx({1: (0.75 + 1 / 3) / 2, 2: (1 + 2 / 3) / 2, 3: 1.0})
    with pytest.raises(ValueError, match="k=4 must be between 1 and the number of experts 3"):
        topk_coverage(s, 4)
    with pytest.raises(ValueError, match="the mask keeps no token"):
        mixture_summary(s, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 2\) does not match"):
        expert_stats(s, mask=torch.ones(1, 2))


def test_compare_two_prompts_by_hand():
    s, mask = hand_tensor()
    a = expert_stats(s, NAMES, LAYERS, mask=mask)
    b = expert_stats(torch.full((1, 4, 2, 3), 1 / 3), NAMES, LAYERS)  # uniform: 1/3 each, alpha dominates (ties)
    d = compare(a, b)
    assert d.mean_weight == pytest.approx({"alpha": 0.3125 - 1 / 3, "beta": 0.3625 - 1 / 3, "gamma": 0.325 - 1 / 3})
    assert d.dominant_share == pytest.approx({"alpha": -1.0, "beta": 0.5, "gamma": 0.5})
    assert d.layer_mean_weight["m.l1.q"] == pytest.approx({"alpha": 0.275 - 1 / 3, "beta": 0.475 - 1 / 3,
                                                           "gamma": 0.25 - 1 / 3})
    # ½ (|0.3125 - 1/3| + |0.3625 - 1/3| + |0.325 - 1/3|) = ½ (0.0208333 + 0.0291667 + 0.0083333)
    assert d.total_variation == pytest.approx(0.5 * (1 / 48 + 7 / 240 + 1 / 120))
    assert compare(a, a).total_variation == 0.0
    with pytest.raises(ValueError, match="cannot compare statistics of experts"):
        compare(a, expert_stats(s, ["x", "y", "z"], LAYERS))


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


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_token_heatmap_png_size_and_row_labels(tmp_path):
    tok = tiny_tokenizer()
    ids = tok("Hi yo")["input_ids"]
    decoded = [tok.decode([i]) for i in ids]
    assert decoded == ["H", "i", " ", "y", "o"]
    s = torch.rand(5, 2, 3)
    (page,) = token_expert_heatmap(s, decoded, NAMES, tmp_path)
    assert page.png == tmp_path / "tokens-p01.png" and page.svg.read_text().lstrip().startswith("<?xml")
    # width: labels 80 + 3 experts x 60 + colour bar 100; height: 50 + 5 rows x 20 + 90
    assert png_size(page.png) == page.size_px == (360, 240)
    assert page.y_labels == ["H", "i", "\u2423", "y", "o"] == [display_token(t) for t in decoded]
    assert page.x_labels == NAMES


def test_200_tokens_are_paginated_at_64_rows(tmp_path):
    tokens = [f"t{i}" for i in range(200)]
    pages = token_expert_heatmap(torch.rand(200, 2, 3), tokens, NAMES, tmp_path)
    assert [len(p.y_labels) for p in pages] == [64, 64, 64, 8]
    assert sum((p.y_labels for p in pages), []) == tokens
    assert [png_size(p.png)[1] for p in pages] == [50 + 64 * 20 + 90] * 3 + [50 + 8 * 20 + 90]
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"tokens-p0{i}.{x}" for i in range(1, 5) for x in ("png", "svg")]
    shares = generation_share_plot(torch.rand(40, 2, 3), tokens[:40], NAMES, tmp_path, per_page=32)
    assert [p.x_labels for p in shares] == [tokens[:32], tokens[32:40]]
    # width: axis 70 + 32 tokens x 16 + legend 170 (a short last page keeps a 12-token minimum width)
    assert [png_size(p.png) for p in shares] == [(70 + 32 * 16 + 170, 460), (70 + 12 * 16 + 170, 460)]
    assert shares[0].legend == NAMES


def test_layer_heatmap_has_one_row_per_module(tmp_path):
    layers = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    (page,) = layer_expert_heatmap(torch.rand(7, 6, 3), layers, NAMES, tmp_path)
    assert page.y_labels == [f"{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    assert png_size(page.png)[1] == 50 + 6 * 20 + 90
    with pytest.raises(ValueError, match=r"do not fit \[T, L=6, E=3\]"):
        layer_expert_heatmap(torch.rand(7, 5, 3), layers, NAMES, tmp_path)


@pytest.fixture(scope="module")
def saved_model(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "xlora"
    build(llama, seed=0).save_pretrained(out)
    return out


TABLE_ROW = re.compile(r"^(alpha|beta|gamma)\s+([0-9.]+)\s+([0-9.]+)$")


def test_inspect_cli_prints_the_statistics_and_writes_the_files(saved_model, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(["inspect", str(saved_model), "Hello there", "--generate", "6", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = {m[1]: (float(m[2]), float(m[3])) for line in printed if (m := TABLE_ROW.match(line))}

    from xlora.saving import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(saved_model)
    enc = tok("Hello there", return_tensors="pt")
    with torch.no_grad():
        recorder = StepRecorder()
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, observer=recorder, pad_token_id=0)
    steps = recorder.steps
    direct = torch.cat([s[0] for s in steps[: gen.shape[1] - enc["input_ids"].shape[1]]])  # [11 + 6 - 1, L, E]
    st = expert_stats(direct, model.xlora_config.expert_names, model.adapted_modules)
    assert set(rows) == set(NAMES)
    for n in NAMES:
        assert rows[n] == pytest.approx((st.mean_weight[n], st.dominant_share[n]), abs=6e-5)
    assert printed[0].startswith(f"{direct.shape[0]} tokens read (prompt 11, generated 6) x 14 modules x 3 experts")
    # the prompt line: each token marked by the expert that predicted it; counts match the shares
    prompt_line = next(line for line in printed if line.startswith("prompt: "))
    marks = re.findall(r"\[(alpha|beta|gamma|-)\]([^\[]*)", prompt_line[len("prompt: "):])
    assert "".join(t for _, t in marks) == "Hello there" and marks[0] == ("-", "H")
    dominant = direct.mean(1).argmax(-1).tolist()
    expected = [NAMES[e] for e in dominant[:10]]
    assert [m for m, t in marks[1:] for _ in t] == expected
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(["scalings.safetensors", "stats.json"] + [f"{s}-p01.{x}" for s in ("tokens", "layers",
                                                                      "generation") for x in ("png", "svg")])
    assert printed[-1] == f"wrote 8 files to {out_dir}"
    log = ScalingsLog.load(out_dir / "scalings.safetensors")
    assert torch.equal(log.sequence(0)[1], direct) and log.info["new_ids"] == gen[0, 11:].tolist()
    stats = json.loads((out_dir / "stats.json").read_text())
    assert stats["expert_stats"]["mean_weight"] == pytest.approx(st.mean_weight)
    assert png_size(out_dir / "tokens-p01.png")[1] == 50 + direct.shape[0] * 20 + 90


def test_inspect_chat_without_generation_and_rich_output(saved_model, tmp_path, capsys):
    from xlora.analysis.inspect import inspect_prompt, print_inspection
    from xlora.saving import load_model_and_tokenizer

    assert main(["inspect", str(saved_model), "Hi", "--chat", "--out", str(tmp_path)]) == 0
    assert "answer:" not in capsys.readouterr().out
    assert not list(tmp_path.glob("generation-*")) and (tmp_path / "tokens-p01.png").is_file()
    model, tok = load_model_and_tokenizer(saved_model)
    result = inspect_prompt(model, tok, "Hi", chat=True)
    assert result.rows.shape[0] == len(tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                               add_generation_prompt=True, tokenize=True)["input_ids"])
    buf = io.StringIO()
    print_inspection(result, tok, buf, color=True)
    text = buf.getvalue()
    assert "\x1b[" in text and all(n in text for n in NAMES)
    assert f"{result.stats.mean_weight['alpha']:.4f}" in text
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "missing"), "hi"]) == 2
    assert capsys.readouterr().err.startswith("xlora inspect: error: X-LoRA directory")


def test_the_readme_example_runs_and_its_numbers_hold(llama, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Seeing the mixture"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = XLoraModel(llama.base(), XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()})).eval()
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    monkeypatch.chdir(tmp_path)
    scope = {"model": model, "tok": tok}
    with torch.no_grad():
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    bio, chem, log = scope["bio"], scope["chem"], scope["log"]
    ids, s = log.sequence(1)
    assert ids.tolist() == tok("a chem prompt")["input_ids"]  # padding dropped
    assert sum(bio.mean_weight.values()) == pytest.approx(1.0)  # softmax mixture
    diff = compare(bio, chem)
    for name in bio.mean_weight:
        assert diff.mean_weight[name] == pytest.approx(bio.mean_weight[name] - chem.mean_weight[name])
    assert "total_variation" in capsys.readouterr().out
