"""`xlora inspect` and the README's analysis example."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_head, tiny_tokenizer
from test_log import build
from test_plots import png_size

from xlora import XLoraConfig, XLoraModel
from xlora.analysis import ScalingsLog, compare, expert_stats
from xlora.cli import main
from xlora.generation import StepRecorder

NAMES = ["alpha", "beta", "gamma"]


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

    from xlora.pretrained import load_model_and_tokenizer

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
    # every token after the first, each with the row that wrote it (row t wrote token t + 1)
    written = enc["input_ids"][0, 1:].tolist() + gen[0, 11:].tolist()
    assert [p for p, _, _ in stats["token_experts"]] == stats["tokens"] == [tok.decode([i]) for i in written]
    assert [e for _, e, _ in stats["token_experts"]] == [NAMES[e] for e in dominant]
    # the head has one mixture for all 14 modules: the module plot is one row
    assert png_size(out_dir / "layers-p01.png")[1] == 50 + 1 * 20 + 90


def test_inspect_chat_without_generation_and_rich_output(saved_model, tmp_path, capsys):
    from xlora.analysis.inspect import inspect_prompt, print_inspection
    from xlora.pretrained import load_model_and_tokenizer

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
    assert list(diff.layer_mean_weight) == model.adapted_modules  # named modules, not layer0 ... layer13
    for name in bio.mean_weight:
        assert diff.mean_weight[name] == pytest.approx(bio.mean_weight[name] - chem.mean_weight[name])
    assert "total_variation" in capsys.readouterr().out


def test_inspect_and_show_experts_attribute_the_same_rows_to_the_same_tokens(llama, saved_model, capsys):
    """The model's own rows: inspect's answer (from the log, reading order) and --show-experts (from a
    StepRecorder) show each generated token with the same expert and weight."""
    from xlora.analysis.inspect import inspect_prompt
    from xlora.pretrained import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(saved_model)
    answer = inspect_prompt(model, tok, "Hello there", generate=8).answer
    assert main(["generate", str(saved_model), "Hello there", "--max-new-tokens", "8", "--show-experts"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["#", "token", "written"] and "at the step before" in out[1]
    shown = [(line[6:23].strip(), line[23:40].strip(), float(line[40:])) for line in out[2:]]
    assert [(repr(p), e, round(w, 3)) for p, (e, w) in zip(answer.pieces(tok), answer.dominant(NAMES))] == \
        [(p, e, pytest.approx(w, abs=1e-3)) for p, e, w in shown]
    assert len(shown) == 8


def test_layerwise_heads_plot_one_row_per_decoder_layer_and_stats_name_modules(llama, tmp_path):
    from xlora.analysis.inspect import inspect_prompt, write_outputs

    config = XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}, head_hidden_size=16,
                         layerwise_scalings=True)
    model = XLoraModel(llama.base(), config).eval()
    randomize_head(model, 5, 0.7)
    tok = tiny_tokenizer()
    result = inspect_prompt(model, tok, "Hello", generate=2)
    assert list(result.stats.layer_mean_weight) == model.adapted_modules
    assert model.adapted_modules[0] == "model.layers.0.self_attn.q_proj" and len(model.adapted_modules) == 14
    assert list(result.log.expert_stats(0).layer_mean_weight) == model.adapted_modules
    write_outputs(result, tok, tmp_path)
    assert png_size(tmp_path / "layers-p01.png")[1] == 50 + 2 * 20 + 90  # layers 0 and 1, 7 modules each
