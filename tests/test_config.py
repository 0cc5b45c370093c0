"""XLoraConfig: every bad value is refused with a message naming the field and the value; exact JSON round-trip."""

from __future__ import annotations

import json
import os
import re

import pytest

from xlora import XLoraConfig
from xlora.config import normalize_experts

EXPERTS = {"bio": "./bio", "chem": "./chem"}


def config(**kw) -> XLoraConfig:
    kw.setdefault("experts", dict(EXPERTS))
    return XLoraConfig(**kw)


def refused(match: str, **kw) -> str:
    with pytest.raises(ValueError, match=match) as info:
        config(**kw)
    return str(info.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("head_depth", 0, "head_depth must be an integer >= 1, got 0"),
        ("head_depth", 1.5, "head_depth must be an integer >= 1, got 1.5"),
        ("head_depth", True, "head_depth must be an integer >= 1, got True"),
        ("head_hidden_size", 0, "head_hidden_size must be an integer >= 1, got 0"),
        ("head_dropout", 1.0, "head_dropout must be in [0, 1), got 1.0"),
        ("head_dropout", -0.1, "head_dropout must be in [0, 1), got -0.1"),
        ("softmax_temperature", 0, "softmax_temperature must be > 0, got 0.0"),
        ("softmax_temperature", -2.0, "softmax_temperature must be > 0, got -2.0"),
        ("top_k", 0, "top_k must be an integer >= 1, got 0"),
        ("hidden_size", 0, "hidden_size must be an integer >= 1, got 0"),
        ("num_adapted_modules", -3, "num_adapted_modules must be an integer >= 1, got -3"),
    ],
)
def test_bad_numbers_name_field_and_value(field, value, message):
    assert refused(re.escape(message), **{field: value}) == message


@pytest.mark.parametrize(
    "field", ["head_dropout", "softmax_temperature", "scaling_pass_value", "global_scaling_weight"]
)
@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_floats(field, value, shown):
    assert refused(re.escape(field), **{field: value}) == f"{field} must be a finite number, got {shown}"


@pytest.mark.parametrize("field", ["head_dropout", "global_scaling_weight"])
def test_non_numeric_floats(field):
    assert refused(field, **{field: "0.5"}) == f"{field} must be a finite number, got '0.5'"


@pytest.mark.parametrize(
    "field",
    ["head_bias", "head_relu_dropout", "enable_softmax", "enable_softmax_topk", "layerwise_scalings",
     "use_trainable_adapters"],
)
@pytest.mark.parametrize("value, shown", [(1, "1 (int)"), ("yes", "'yes' (str)"), (None, "None (NoneType)")])
def test_non_bool_flags(field, value, shown):
    kw = {field: value}
    if field == "enable_softmax_topk":
        kw["top_k"] = 1  # so that only the type is wrong
    assert refused(field, **kw) == f"{field} must be true or false, got {shown}"


def test_top_k_larger_than_number_of_experts():
    msg = refused("top_k=3", top_k=3)
    assert msg == "top_k=3 exceeds the number of experts (2); use a value in 1..2 or None for dense mixing"
    assert config(top_k=2).top_k == 2


def test_softmax_topk_needs_top_k():
    msg = refused("enable_softmax_topk", enable_softmax_topk=True)
    assert msg == "enable_softmax_topk=True needs top_k to be set (e.g. top_k=2)"
    assert config(enable_softmax_topk=True, top_k=1).enable_softmax_topk is True


@pytest.mark.parametrize("experts", [{}, [], ()])
def test_empty_experts(experts):
    msg = refused("experts is empty", experts=experts)
    assert msg.startswith("experts is empty: X-LoRA needs at least one LoRA expert")


def test_default_experts_are_empty_and_refused():
    with pytest.raises(ValueError, match="experts is empty"):
        XLoraConfig()


def test_duplicate_names_in_cli_list_are_refused():
    msg = refused("duplicate", experts=["a=./x", "b=./y", "a=./z"])
    assert msg == "experts: duplicate expert name 'a'; give every expert a distinct name"
    # the same through (name, path) pairs
    msg = refused("duplicate", experts=[("a", "./x"), ("a", "./z")])
    assert "'a'" in msg


@pytest.mark.parametrize("bad", ["a/b", "../up", "", "has space", ".hidden", "é"])
def test_invalid_expert_name(bad):
    msg = refused("is not valid", experts={bad: "./x"})
    assert msg.startswith(f"experts: name {bad!r} is not valid; use letters, digits, '_' and '-'")


def test_invalid_expert_name_in_cli_form():
    msg = refused("is not valid", experts=["a/b=./x"])
    assert msg.startswith("experts: name 'a/b' is not valid")


def test_entry_without_equals():
    msg = refused("name=path", experts=["chem"])
    assert msg == "experts: entry 'chem' is not of the form name=path, e.g. 'chem=./adapters/chem'"


def test_bad_entries_and_paths():
    assert refused("pair", experts=[("a", "b", "c")]) == (
        "experts: entry ('a', 'b', 'c') must be a (name, path) pair or a 'name=path' string"
    )
    assert refused("path of expert", experts=["a="]) == "experts: path of expert 'a' must be a directory path, got ''"
    assert refused("path of expert", experts={"a": 3}) == "experts: path of expert 'a' must be a directory path, got 3"
    assert refused("dict", experts="a=./x") == "experts must be a dict of name -> adapter directory, got str"


def test_cli_form_is_parsed_in_order_and_stripped():
    assert normalize_experts(["b = ./y", "a=./x=1"]) == {"b": "./y", "a": "./x=1"}
    cfg = config(experts=["z=./z", "a=./a", "m=./m"], top_k=3)
    assert cfg.expert_names == ["z", "a", "m"]
    assert cfg.num_experts == 3


def test_defaults():
    cfg = config()
    assert (cfg.head_depth, cfg.head_hidden_size, cfg.head_dropout, cfg.softmax_temperature) == (1, 2048, 0.2, 1.0)
    assert (cfg.top_k, cfg.enable_softmax, cfg.enable_softmax_topk, cfg.layerwise_scalings) == (None, True, False, False)
    assert (cfg.scaling_pass_value, cfg.global_scaling_weight) == (0.0, 1.0)


def test_json_round_trip_is_exact(tmp_path):
    cfg = config(
        experts={"bio": "/abs/bio", "chem": "rel/chem", "math-2": "m"},
        head_depth=3, head_hidden_size=17, head_dropout=0.1, head_bias=False, head_relu_dropout=False,
        enable_softmax=False, softmax_temperature=0.3, top_k=2, enable_softmax_topk=True, layerwise_scalings=True,
        scaling_pass_value=0.125, global_scaling_weight=1 / 3, use_trainable_adapters=True,
        base_model_name_or_path="/models/base", hidden_size=32, num_adapted_modules=14,
    )
    path = tmp_path / "xlora_config.json"
    cfg.to_json_file(path)
    back = XLoraConfig.from_json_file(path)
    assert back == cfg
    assert back.global_scaling_weight == 1 / 3  # bit-exact float
    assert list(back.experts) == ["bio", "chem", "math-2"]  # order is the expert axis
    assert json.loads(path.read_text()) == cfg.to_dict()
    assert XLoraConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_round_trip(tmp_path):
    cfg = config()
    cfg.to_json_file(tmp_path / "c.json")
    assert XLoraConfig.from_json_file(tmp_path / "c.json") == cfg


def test_unknown_keys_are_an_error_naming_the_key():
    data = config().to_dict()
    data["xlora_depth"] = 4
    data["zzz"] = 1
    with pytest.raises(ValueError, match=re.escape("unknown X-LoRA config keys ['xlora_depth', 'zzz']")) as info:
        XLoraConfig.from_dict(data)
    assert "'head_depth'" in str(info.value)  # the valid keys are listed


def test_from_dict_validates_values():
    data = config().to_dict()
    data["top_k"] = 5
    with pytest.raises(ValueError, match=re.escape("top_k=5 exceeds the number of experts (2)")):
        XLoraConfig.from_dict(data)
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        XLoraConfig.from_dict([1, 2])


def test_from_json_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"X-LoRA config file {str(missing)!r} does not exist")):
        XLoraConfig.from_json_file(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"X-LoRA config file {str(bad)!r} is not valid JSON")):
        XLoraConfig.from_json_file(bad)


def test_json_file_is_written_atomically(tmp_path):
    path = tmp_path / "xlora_config.json"
    config().to_json_file(path)
    config(head_depth=2).to_json_file(path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["xlora_config.json"]
    assert XLoraConfig.from_json_file(path).head_depth == 2


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "xlora_config.json"
    config(head_depth=2).to_json_file(path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        config(head_depth=3).to_json_file(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["xlora_config.json"]
