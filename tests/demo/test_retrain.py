"""Retraining: an expert stopped and rerun ends with the same weights as one trained in one go (the checkpoint
loses nothing); the suite's phases write training.json with every run's time and settings, skip finished
experts, and refuse bad phases before training anything. Tiny Llama base, CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from science_rows import write_rows

from xlora.demo import domains

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama").save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_stopped_expert_resumes_to_the_same_weights(base_dir, tmp_path):
    from xlora.demo.retrain import train_expert

    records = domains.generate("mathematics", "train", 12)
    kw = {"steps": 6, "batch_size": 4, "targets": ["q_proj", "v_proj"], "log_every": 10}
    whole = train_expert(base_dir, records, tmp_path / "whole", **kw)
    ckpt = tmp_path / "math.ckpt.safetensors"
    part = train_expert(base_dir, records, tmp_path / "split", checkpoint=ckpt, save_every=2, max_new_steps=3,
                        data_id="d1", **kw)
    assert (part["finished"], part["resumed_from"]) == (False, 0) and ckpt.is_file()
    assert not (tmp_path / "split").exists()  # nothing saved before the end
    rest = train_expert(base_dir, records, tmp_path / "split", checkpoint=ckpt, data_id="d1", **kw)
    assert (rest["finished"], rest["resumed_from"]) == (True, 3) and not ckpt.is_file()
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["first_loss"] == pytest.approx(part["first_loss"], abs=0)
    # a checkpoint of other data is not resumed from
    train_expert(base_dir, records, tmp_path / "other", checkpoint=ckpt, max_new_steps=2, data_id="d1", **kw)
    again = train_expert(base_dir, records, tmp_path / "other", checkpoint=ckpt, data_id="d2", **kw)
    assert again["resumed_from"] == 0 and again["finished"]


def test_a_stop_request_checkpoints_the_finished_step_and_exits(base_dir, tmp_path):
    from xlora.demo import retrain
    from xlora.train import loop_checkpoint

    records = domains.generate("mathematics", "train", 12)
    kw = {"steps": 5, "batch_size": 4, "targets": ["q_proj", "v_proj"], "log_every": 10, "data_id": "d"}
    retrain.train_expert(base_dir, records, tmp_path / "whole", **kw)
    ckpt = tmp_path / "c.safetensors"
    loop_checkpoint.request_stop()  # what SIGTERM does in the command
    try:
        with pytest.raises(SystemExit, match=r"stopped after step 1/5"):
            retrain.train_expert(base_dir, records, tmp_path / "split", checkpoint=ckpt, **kw)
    finally:
        loop_checkpoint.STOP.clear()
    assert ckpt.is_file() and not (tmp_path / "split").exists()
    rest = retrain.train_expert(base_dir, records, tmp_path / "split", checkpoint=ckpt, **kw)
    assert rest["resumed_from"] == 1 and rest["finished"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_suite_retraining_records_every_run_and_skips_finished_experts(base_dir, tmp_path):
    pytest.importorskip("rdkit")
    pytest.importorskip("Bio")
    pytest.importorskip("accelerate")
    from xlora.demo import retrain_suite, suite

    rows = write_rows(tmp_path / "rows", n_molecules=300, n_peptides=120)
    (rows / "peptides.discarded.jsonl").write_text('{"sequence": "AAAAAAAAAA", "seed": 1, "peak_force_pn": 1.0}\n')
    old = suite.SIZES.copy()
    suite.SIZES.update({"train": 8, "validation": 4, "test": 4, "test_unseen": 4})
    try:
        log = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("data", "expert:quantum,general"),
                                          rows=rows, expert_steps=2, base_dir=base_dir)
    finally:
        suite.SIZES.clear()
        suite.SIZES.update(old)
    assert (tmp_path / "data" / "rows" / "molecules.jsonl.gz").is_file()
    assert [r["phase"] for r in log["runs"]] == ["data", "expert:quantum,general"]
    data_run, expert_run = log["runs"]
    assert data_run["result"]["files"]["train/quantum.jsonl"] == 8 and data_run["settings"]["rows"] == str(rows)
    assert data_run["result"]["rows"] == {"molecules.jsonl.gz": 301, "peptides.jsonl.gz": 240}
    assert expert_run["settings"]["steps"] == {"quantum": 2, "general": 2} and expert_run["seconds"] > 0
    assert expert_run["settings"]["torch_threads"] == torch.get_num_threads()
    q = log["experts"]["quantum"]
    assert q["finished"] and q["records"] == 8 and len(q["sha256"]) == 64 and q["train_file"].endswith("quantum.jsonl")
    assert (tmp_path / "out" / "experts" / "quantum" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "training.json").read_text())
    assert saved == json.loads(json.dumps(log))
    before = _weights(tmp_path / "out" / "experts" / "quantum")
    manifest = (tmp_path / "data" / "manifest.json").read_text()
    again = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("data", "expert:quantum"),
                                        base_dir=base_dir)
    assert again["experts"]["quantum"] == q and len(again["runs"]) == 4  # skipped, and the runs recorded
    assert again["runs"][2]["result"]["skipped"].endswith("exists (data:refresh rewrites it)")
    assert (tmp_path / "data" / "manifest.json").read_text() == manifest
    after = _weights(tmp_path / "out" / "experts" / "quantum")
    assert all(torch.equal(before[k], after[k]) for k in before)


def _retrain(tmp_path, phases):
    from xlora.demo.retrain import retrain

    return retrain(tmp_path / "out", phases)


def _retrain_suite(tmp_path, phases):
    from xlora.demo.retrain_suite import retrain_suite

    return retrain_suite(tmp_path / "out", tmp_path / "data", phases)


@pytest.mark.parametrize("command, phases, message", [
    (_retrain, ("experts", "hed"), r"unknown retraining phase 'hed'"),
    (_retrain, ("expert:protein,foo",), r"names unknown domains \['foo'\]"),
    (_retrain, ("expert:",), r"unknown retraining phase 'expert:'"),
    (_retrain_suite, ("data", "hed"), r"unknown suite phase 'hed'"),
    (_retrain_suite, ("expert:quantum,protien",), r"names unknown domains \['protien'\]"),
    (_retrain_suite, ("data",), r"the data phase needs rows"),
    (_retrain_suite, ("correct",), r"the correct phase corrects the head phase's model, and .* does not exist: run "
                                   r"the head phase first"),
])
def test_retraining_refuses_bad_phases_before_anything(tmp_path, command, phases, message):
    with pytest.raises(ValueError, match=message):
        command(tmp_path, phases)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()  # nothing trained or written


def test_suite_head_trains_on_the_head_file_and_resumes(base_dir, tmp_path):
    pytest.importorskip("rdkit")
    pytest.importorskip("Bio")
    pytest.importorskip("accelerate")
    from xlora.demo import retrain_suite, suite

    rows = write_rows(tmp_path / "rows", n_molecules=300, n_peptides=120)
    old = suite.SIZES.copy()
    suite.SIZES.update({"train": 4, "validation": 2, "test": 2, "test_unseen": 2})
    try:
        retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("data", "experts"), rows=rows,
                                    expert_steps=1, base_dir=base_dir)
    finally:
        suite.SIZES.clear()
        suite.SIZES.update(old)
    log = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("head",), head_steps=2, base_dir=base_dir)
    head = log["head"]
    assert head["steps"] == 2 and not head["resumed"] and head["train_file"].endswith("head_train.jsonl")
    assert head["eval_file"].endswith("validation.jsonl") and head["eval_loss"] is not None
    cfg = json.loads((tmp_path / "out" / "xlora_config.json").read_text())
    assert cfg["experts"] == {d: f"experts/{d}" for d in suite.DOMAINS}
    assert json.loads((tmp_path / "out" / "data_manifest.json").read_text())["domains"] == list(suite.DOMAINS)
    options = log["runs"][-1]["settings"]["options"]  # the shipped suite head's recipe by default
    assert (options["routing_weight"], options["routing_tokens"]) == (1.0, "scored")
    log = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("head",), head_steps=3, base_dir=base_dir)
    assert log["head"]["resumed"] and log["head"]["steps"] == 3
    assert [r["phase"] for r in log["runs"]] == ["data", "experts", "head", "head"]
    log = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("correct",), correct_steps=2,
                                      base_dir=base_dir)
    corrected = tmp_path / "out" / "corrected"
    assert log["corrected"]["steps"] == 2 and log["runs"][-1]["phase"] == "correct"
    cfg = json.loads((corrected / "xlora_config.json").read_text())
    assert cfg["experts"] == {d: f"../experts/{d}" for d in suite.DOMAINS} and cfg["scaling_pass_layers"] is None
    report = json.loads((corrected / "distill.json").read_text())
    assert {k: report["settings"][k] for k in retrain_suite.SUITE_CORRECT_OPTIONS} == retrain_suite.SUITE_CORRECT_OPTIONS
    assert report["settings"]["train_file"].endswith("head_train.jsonl") and report["final"]["routed_records"] == 12  # of 14: the two
    # graph passages lose their completion to max_length=192
    assert report["initial"]["own_top1"] == report["initial"]["teacher_own_top1"]  # it starts as the head phase's
    head = (corrected / "xlora_head.safetensors").read_bytes()
    log = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("data", "correct"), correct_steps=2,
                                      base_dir=base_dir)  # the data phase rewrites training.json, not the teacher
    assert log["corrected"]["skipped"].startswith("finished before") and log["corrected"]["final"] == report["final"]
    assert (corrected / "xlora_head.safetensors").read_bytes() == head
    log = retrain_suite.retrain_suite(tmp_path / "out", tmp_path / "data", ("correct",), correct_steps=3,
                                      base_dir=base_dir)  # other settings: run again
    assert "skipped" not in log["corrected"] and log["corrected"]["steps"] == 3


def test_the_command_line_takes_phases_after_the_options(tmp_path, capsys):
    from xlora.demo.retrain_suite import main

    with pytest.raises(ValueError, match="unknown suite phase 'hed'"):
        main([str(tmp_path / "out"), "--suite", str(tmp_path / "data"), "--threads", "1", "data", "hed"])
    with pytest.raises(ValueError, match="unknown retraining phase 'hed'"):
        main([str(tmp_path / "out"), "experts", "--threads", "1", "hed"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "out"), "--suite", str(tmp_path / "data"), "head", "--head-steps", "0"])
    assert "--head-steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_head_options_parse_json_values_and_name_bad_pairs():
    from xlora.demo.retrain_suite import parse_head_options

    got = parse_head_options(["routing_weight=0.5", "layerwise_scalings=true", "regularizer=entropy", "top_k=2"])
    assert got == {"routing_weight": 0.5, "layerwise_scalings": True, "regularizer": "entropy", "top_k": 2}
    with pytest.raises(ValueError, match="KEY=VALUE.*'routing_weight'"):
        parse_head_options(["routing_weight"])
