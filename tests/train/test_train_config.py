"""TrainConfig: flat keys split between training and X-LoRA options, round trips, and errors that name the field."""

from __future__ import annotations

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


def test_unknown_keys_are_listed_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown training config keys \['learning_rat'\]; valid keys are \[.*"
                                         r"'learning_rate'.*\]"):
        TrainConfig.from_dict({**REQUIRED, "learning_rat": 0.1})


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


def test_the_xlora_options_are_required():
    with pytest.raises(ValueError, match=r"xlora \(the X-LoRA options, at least experts=\{name: path\}\) is required"):
        TrainConfig(base_model="b", train_file="t", output_dir="o")


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
