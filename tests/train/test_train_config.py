"""TrainConfig: flat keys split between training and X-LoRA options, round trips, and errors that name the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from xlora import XLoraConfig
from xlora.train.config import TrainConfig

REQUIRED = {"base_model": "base", "train_file": "train.jsonl", "output_dir": "out", "experts": {"a": "/e/a"}}


def test_flat_keys_go_to_their_dataclass_and_round_trip():
    cfg = TrainConfig.from_dict({**REQUIRED, "max_length": 64, "head_depth": 2, "top_k": 1, "seed": 7})
    assert (cfg.max_length, cfg.seed) == (64, 7)
    assert isinstance(cfg.xlora, XLoraConfig)
    assert (cfg.xlora.head_depth, cfg.xlora.top_k, cfg.xlora.experts) == (2, 1, {"a": "/e/a"})
    flat = cfg.to_dict()
    assert flat["max_length"] == 64 and flat["head_depth"] == 2 and "xlora" not in flat
    assert TrainConfig.from_dict(json.loads(json.dumps(flat))) == cfg


def test_defaults_are_the_dataclass_defaults():
    cfg = TrainConfig.from_dict(REQUIRED)
    assert (cfg.learning_rate, cfg.max_steps, cfg.mixed_precision, cfg.keep_checkpoints) == (1e-3, None, "no", 3)
    assert cfg.xlora.head_depth == XLoraConfig(experts={"a": "/e/a"}).head_depth


@pytest.mark.parametrize("missing", ["base_model", "train_file", "output_dir"])
def test_a_missing_path_names_its_flag(missing):
    with pytest.raises(ValueError, match=rf"{missing} is required \(got ''\), e\.g\. --{missing.replace('_', '-')} PATH"):
        TrainConfig.from_dict({**REQUIRED, missing: ""})


def test_an_unknown_key_names_the_closest_and_lists_only_user_facing_keys():
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({**REQUIRED, "learning-rat": 0.1})
    message = str(err.value)
    head, keys = message.split(": did you mean 'learning_rate'? The keys are the `xlora train` flags' names, "
                               "with '_' or '-': ")
    assert head == "unknown training config key 'learning-rat'"
    listed = keys.split(", ")
    flags = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(XLoraConfig)}
    internal = {"xlora", "hidden_size", "num_adapted_modules", "base_model_name_or_path"}  # no flags either
    assert listed == sorted(flags - internal) and len(listed) == len(flags) - 4
    assert {"base_model", "experts", "head_hidden_size", "chat", "max_steps"} <= set(listed)
    assert not {"xlora", "hidden_size", "num_adapted_modules", "base_model_name_or_path"} & set(listed)
    with pytest.raises(ValueError, match=r"^unknown training config key 'zzz': The keys are"):
        TrainConfig.from_dict({**REQUIRED, "zzz": 1})  # nothing close: no suggestion


def test_keys_may_be_spelled_as_the_flags():
    dashed = {"base-model": "base", "train-file": "train.jsonl", "output-dir": "out", "experts": {"a": "/e/a"},
              "head-hidden-size": 16, "max_steps": 3}
    cfg = TrainConfig.from_dict(dashed)
    assert (cfg.base_model, cfg.output_dir, cfg.xlora.head_hidden_size, cfg.max_steps) == ("base", "out", 16, 3)
    assert cfg == TrainConfig.from_dict({**REQUIRED, "head_hidden_size": 16, "max_steps": 3})
    with pytest.raises(ValueError, match=r"^training config key 'max_steps' is given twice .*; keep one$"):
        TrainConfig.from_dict({**REQUIRED, "max-steps": 3, "max_steps": 4})


def test_missing_experts_are_asked_for_in_cli_and_file_syntax_not_python():
    expected = ('experts is required: on the command line --experts NAME=PATH [NAME=PATH ...], in a config file '
                '"experts": {"NAME": "PATH", ...}')
    for data in ({k: v for k, v in REQUIRED.items() if k != "experts"}, {**REQUIRED, "experts": {}}):
        with pytest.raises(ValueError) as err:
            TrainConfig.from_dict(data)
        assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        TrainConfig(base_model="b", train_file="t", output_dir="o")
    assert str(err.value) == "xlora (the X-LoRA options) is required: at least the experts, " + expected[21:]
    assert "={" not in str(err.value)


def test_a_config_file_resolves_relative_paths_against_its_folder(tmp_path, monkeypatch):
    from xlora.train.config import read_config_file

    folder = tmp_path / "project"
    (folder / "models" / "base").mkdir(parents=True)
    (folder / "c.yaml").write_text("base-model: models/base\ntrain_file: data/train.jsonl\noutput-dir: runs/one\n"
                                   "eval_file: /abs/eval.jsonl\nexperts: {bio: experts/bio, chem: /abs/chem}\n")
    (folder / "ids.json").write_text(json.dumps({"base_model": "org/cached-model", "experts": ["bio=experts/bio"]}))
    monkeypatch.chdir(tmp_path)  # another working directory than the file's
    cfg = TrainConfig.from_file("project/c.yaml")
    root = str(folder.resolve())
    assert (cfg.base_model, cfg.train_file, cfg.output_dir, cfg.eval_file) == (
        f"{root}/models/base", f"{root}/data/train.jsonl", f"{root}/runs/one", "/abs/eval.jsonl")
    assert cfg.xlora.experts == {"bio": f"{root}/experts/bio", "chem": "/abs/chem"}
    # a base_model that is no folder next to the file stays as given (a model id in the Hugging Face cache)
    assert read_config_file("project/ids.json") == {"base_model": "org/cached-model",
                                                    "experts": [f"bio={root}/experts/bio"]}


@pytest.mark.parametrize("field, value, message", [
    ("max_length", 1, r"max_length must be an integer >= 2, got 1"),
    ("per_device_batch_size", 2.0, r"per_device_batch_size must be an integer >= 1, got 2\.0"),
    ("max_steps", 0, r"max_steps must be an integer >= 1, got 0"),
    ("keep_checkpoints", 0, r"keep_checkpoints must be an integer >= 1, got 0"),
    ("learning_rate", float("nan"), r"learning_rate must be a finite number, got nan"),
    ("learning_rate", 0.0, r"learning_rate must be > 0, got 0\.0"),
    ("num_epochs", 0, r"num_epochs must be > 0, got 0"),
    ("adam_beta2", 1.0, r"adam_beta2 must be in \[0, 1\), got 1\.0"),
    ("max_grad_norm", -1, r"max_grad_norm must be >= 0, got -1"),
    ("mixed_precision", "fp32", r"mixed_precision must be one of \('no', 'fp16', 'bf16'\), got 'fp32'"),
    ("regularizer", "l2", r"regularizer must be one of \('none', 'balance', 'entropy'\), got 'l2'"),
    ("packing", "yes", r"packing must be true or false, got 'yes' \(str\)"),
    ("gradient_checkpointing", "no", r"gradient_checkpointing must be true or false, got 'no' \(str\)"),
    ("load_in_8bit", 0, r"load_in_8bit must be true or false, got 0 \(int\)"),
])
def test_bad_values_name_the_field_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**REQUIRED, field: value})


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        TrainConfig.from_dict({**REQUIRED, "resume": True, "overwrite": True})


def test_from_file_reads_json_and_yaml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({**REQUIRED, "max_steps": 5}))
    (tmp_path / "c.yaml").write_text("base_model: base\ntrain_file: train.jsonl\noutput_dir: out\n"
                                     "experts: {a: /e/a}\nmax_steps: 5\n")
    assert TrainConfig.from_file(tmp_path / "c.json") == TrainConfig.from_file(tmp_path / "c.yaml")
    assert TrainConfig.from_file(tmp_path / "c.json").max_steps == 5


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"training config '.*nope\.json' does not exist"):
        TrainConfig.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"training config '.*bad\.json' is not valid JSON"):
        TrainConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ValueError, match=r"training config '.*bad\.yaml' is not valid YAML"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="a training config must be a mapping, got list"):
        TrainConfig.from_file(tmp_path / "list.json")
