"""Distilling a shallow scaling head (xlora.train.distill): exact at k = N, learns at k < N, reloads, refuses."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_setup, randomize_head, tokens

from xlora import XLoraConfig, XLoraModel
from xlora.cli import main
from xlora.train.data import build_dataset, collate
from xlora.train.distill import METRICS_FILE, REPORT_FILE, DistillConfig, distill

pytestmark = pytest.mark.usefixtures("one_thread")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?"


def write_texts(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [json.dumps({"text": "".join(rng.choice(CHARS) for _ in range(rng.randint(6, 30)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 2-layer Llama, 3 experts, and a teacher X-LoRA with a sharp random head saved *bundled* (its
    experts referenced by relative paths), plus train and eval records."""
    root = tmp_path_factory.mktemp("distill")
    setup = build_setup(root, "llama")
    config = XLoraConfig(experts={n: str(p) for n, p in setup.expert_dirs.items()}, head_depth=2, head_hidden_size=16,
                         head_dropout=0.0)
    teacher = XLoraModel(setup.base(), config).eval()
    randomize_head(teacher, seed=5, std=0.7)
    teacher.save_pretrained(root / "teacher", bundle=True)
    return {"root": root, "setup": setup, "teacher": str(root / "teacher"),
            "train": write_texts(root / "train.jsonl", 48, 0), "eval": write_texts(root / "eval.jsonl", 16, 1)}


def config(world, out: str, k: int, **kw) -> DistillConfig:
    options = dict(teacher_dir=world["teacher"], train_file=world["train"], eval_file=world["eval"], steps=5,
                   batch_size=8, learning_rate=1e-2, log_every=1000)
    return DistillConfig(output_dir=str(world["root"] / out), scaling_pass_layers=k, **{**options, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def shallow(world):
    """k = 1 of 2 layers from a fresh head: 150 steps (about 3 s on one core)."""
    return distill(config(world, "k1", 1, init="scratch", steps=150, batch_size=8, learning_rate=2e-2))


def test_the_layers_keyword_runs_a_k_layer_scaling_pass_without_touching_the_config(world):
    teacher = XLoraModel.from_pretrained(world["teacher"]).eval()
    experts = {n: str(p) for n, p in world["setup"].expert_dirs.items()}
    shallow = XLoraModel(world["setup"].base(), XLoraConfig(experts=experts, scaling_pass_layers=1)).eval()
    x = tokens()
    assert torch.equal(teacher.scaling_pass(layers=1, input_ids=x), shallow.scaling_pass(input_ids=x))
    assert torch.equal(shallow.scaling_pass(layers=2, input_ids=x), teacher.scaling_pass(input_ids=x))
    assert (teacher.scaling_pass(input_ids=x) - shallow.scaling_pass(input_ids=x)).abs().max() > 1e-2
    assert teacher.xlora_config.scaling_pass_layers is None and shallow.xlora_config.scaling_pass_layers == 1
    with pytest.raises(ValueError, match="scaling_pass_layers=3 exceeds the base model's 2 decoder layers"):
        teacher.scaling_pass(layers=3, input_ids=x)


def test_all_layers_from_the_teacher_is_exact_from_step_zero(world):
    result = distill(config(world, "kN", 2, init="teacher", steps=5))
    assert result.initial["kl"] < 1e-6 and result.final["kl"] < 1e-6
    assert result.initial["top1"] == 1.0 and result.final["top1"] == 1.0
    assert [m["step"] for m in metrics(result.output_dir)] == [1, 2, 3, 4, 5]
    assert max(m["kl"] for m in metrics(result.output_dir)) < 1e-6
    student = XLoraModel.from_pretrained(result.output_dir).eval()
    teacher = XLoraModel.from_pretrained(world["teacher"]).eval()
    x = tokens(batch=3, seq=9)
    with torch.no_grad():
        torch.testing.assert_close(student.compute_scalings(input_ids=x), teacher.compute_scalings(input_ids=x),
                                   rtol=0, atol=1e-6)
    assert student.xlora_config.scaling_pass_layers is None  # k = N: every layer, as the teacher (exports accept it)


def test_a_shallow_head_from_scratch_learns_the_teachers_routing(shallow):
    first, last = shallow.initial, shallow.final
    assert first["kl"] > 0.05  # the fresh head routes unlike the teacher
    assert last["kl"] < 0.3 * first["kl"], (first, last)
    assert last["top1"] > first["top1"] + 0.2, (first, last)
    steps = metrics(shallow.output_dir)
    assert len(steps) == 150 and all(m["loss"] == m["kl"] for m in steps)
    early, late = sum(m["kl"] for m in steps[:10]) / 10, sum(m["kl"] for m in steps[-10:]) / 10
    assert late < 0.3 * early


def test_the_saved_student_reloads_with_k_and_gives_the_reported_numbers(world, shallow):
    out = shallow.output_dir
    student = XLoraModel.from_pretrained(out).eval()
    teacher = XLoraModel.from_pretrained(world["teacher"]).eval()
    assert student.xlora_config.scaling_pass_layers == 1 and teacher.xlora_config.scaling_pass_layers is None
    saved = json.loads((out / "xlora_config.json").read_text())["experts"]
    for name in saved:  # the teacher's relative paths, rewritten relative to the student's folder
        assert saved[name] == os.path.relpath(Path(world["teacher"]) / "experts" / name, out)
    examples = build_dataset(world["eval"], student_tokenizer(out), 512)[0]
    kl_sum, agree_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 5):
            batch = collate(examples[i:i + 5], 0)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            p, q = teacher.compute_scalings(**inputs).double(), student.compute_scalings(**inputs).double()
            kl = (p * (p / q).log()).sum(-1).mean(-1)  # [b, t]
            agree = (p.argmax(-1) == q.argmax(-1)).double().mean(-1)
            m = batch["attention_mask"].double()
            kl_sum, agree_sum, n = kl_sum + float((kl * m).sum()), agree_sum + float((agree * m).sum()), n + int(m.sum())
    assert abs(kl_sum / n - shallow.final["kl"]) < 1e-6 and abs(agree_sum / n - shallow.final["top1"]) < 1e-6
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["final"] == shallow.final and report["settings"]["scaling_pass_layers"] == 1
    assert report["teacher_layers"] == 2 and report["eval_on"] == "eval_file" and report["seconds"] > 0


def test_a_student_goes_on_from_an_earlier_students_head(world, shallow):
    """init=DIR starts from that folder's head: the first evaluation is the earlier run's last, to the bit."""
    result = distill(config(world, "again", 1, init=str(shallow.output_dir), steps=2, learning_rate=1e-3))
    assert result.initial == shallow.final and result.final["kl"] < shallow.final["kl"] * 1.5
    other = XLoraConfig(experts={n: str(p) for n, p in world["setup"].expert_dirs.items()}, head_depth=2,
                        head_hidden_size=8)  # another head shape over the same experts
    XLoraModel(world["setup"].base(), other).save_pretrained(world["root"] / "narrow", bundle=True)
    with pytest.raises(ValueError, match=r"init='.*narrow': its head's tensors .* are not the student's"):
        distill(config(world, "from_narrow", 1, init=str(world["root"] / "narrow")))
    assert not (world["root"] / "from_narrow").exists()


def student_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out))  # distill saves the tokenizer next to the student


def test_the_lm_loss_reaches_the_student_head(world):
    result = distill(config(world, "lm", 2, init="teacher", steps=20, lm_weight=1.0, learning_rate=5e-2))
    steps = metrics(result.output_dir)
    assert steps[0]["kl"] < 1e-6 and all(m["lm"] > 0 and abs(m["loss"] - m["kl"] - m["lm"]) < 1e-5 for m in steps)
    assert result.final["kl"] > 1e-4  # only the LM term moved it away from the teacher


def test_scored_positions_distil_only_where_a_completion_token_is_predicted(world):
    from xlora.train.distill import load_teacher, make_student, scalings_pair, step_loss

    cfg = config(world, "positions", 1, positions="scored")
    model, _ = load_teacher(cfg)
    student = make_student(model, 1, "scratch")
    ids = tokens(2, 9)
    labels = ids.clone()
    labels[0, :5], labels[1, :7] = -100, -100  # completions: tokens 5-8 and 7-8
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        loss, parts = step_loss(model, student, cfg, batch)
        z_t, _, h_k = scalings_pair(model, student, batch)
        tau = model.xlora_config.softmax_temperature
        p_t, p_s = torch.softmax(z_t.double() / tau, -1), torch.softmax(student.logits(h_k).double() / tau, -1)
        kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean(-1)  # [b, t]
        by_hand = (kl[0, 4:8].sum() + kl[1, 6:8].sum()) / 6  # positions 4-7 and 6-7 predict the completions
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-9)
        every = step_loss(model, student, dataclasses.replace(cfg, positions="all"), batch)[0]
        assert every.item() == pytest.approx(kl.mean().item(), rel=1e-9) and abs(every.item() - loss.item()) > 1e-4
        with_lm, parts = step_loss(model, student, dataclasses.replace(cfg, lm_weight=1.0), batch)
        lm = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels, scalings=student(h_k)).loss
        assert parts["lm"] == pytest.approx(lm.item(), rel=1e-6)  # the LM loss sees the whole sequence
        assert with_lm.item() == pytest.approx(by_hand.item() + lm.item(), rel=1e-6)


def test_a_prefix_mean_student_starts_as_the_teacher_and_saves_its_head_input(world):
    """--prefix-mean from a teacher without it: the teacher's first layer widened with zero columns for the mean, so
    the student starts as the teacher's head on h_k (at k = N: the teacher exactly) and learns; the saved directory
    records head_prefix_mean and k, and its head has the widened input."""
    exact = distill(config(world, "kN_mean", 2, init="teacher", prefix_mean=True, steps=1))
    assert exact.initial["kl"] < 1e-6 and exact.initial["top1"] == 1.0
    plain = distill(config(world, "k1_plain", 1, init="teacher", steps=1))
    result = distill(config(world, "k1_mean", 1, init="teacher", prefix_mean=True, steps=40, learning_rate=2e-2))
    assert result.initial["kl"] == pytest.approx(plain.initial["kl"], abs=1e-6)
    assert result.final["kl"] < 0.8 * result.initial["kl"], (result.initial, result.final)
    student = XLoraModel.from_pretrained(result.output_dir).eval()
    assert student.xlora_config.head_prefix_mean is True and student.head.layers[0].in_features == 2 * 32
    assert student.xlora_config.scaling_pass_layers == 1
    with pytest.raises(ValueError, match="prefix_mean must be true or false, got 1"):
        config(world, "bad", 1, prefix_mean=1)


SETS = {"alpha": "abcdefgh", "beta": "ijklmnop", "gamma": "0123456789"}  # each expert's prompts use its own characters


def write_labelled(path: Path, n: int, seed: int, unlabelled: int = 0) -> str:
    """``n`` prompt/completion records naming their expert in ``domain``, then ``unlabelled`` text records."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        name = rng.choice(sorted(SETS))
        chars = SETS[name]
        lines.append(json.dumps({"prompt": "".join(rng.choice(chars) for _ in range(rng.randint(5, 12))),
                                 "completion": "".join(rng.choice(chars) for _ in range(4)), "domain": name}))
    lines += [json.dumps({"text": "".join(rng.choice("qrstuvwxyz .,") for _ in range(rng.randint(6, 20)))})
              for _ in range(unlabelled)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def labelled(world):
    return {"train": write_labelled(world["root"] / "labelled.jsonl", 48, 0, unlabelled=16),
            "eval": write_labelled(world["root"] / "labelled_eval.jsonl", 24, 1)}


def test_routing_labels_correct_a_trained_head_at_its_own_depth(world, labelled):
    """k = N from the teacher: the routing term moves the head where the labels speak (the suite head H16's recipe)."""
    result = distill(config(world, "corrected", 2, train_file=labelled["train"], eval_file=labelled["eval"], steps=60,
                            learning_rate=2e-2, routing_weight=1.0, positions="unrouted", weight_decay=0.1))
    first, last = result.initial, result.final
    assert first["kl"] < 1e-6 and first["own_top1"] == first["teacher_own_top1"] < 0.2  # the random teacher misroutes
    assert last["own_top1"] >= 0.5 and last["teacher_own_top1"] == first["teacher_own_top1"], last  # measured 0.625
    assert first["routed_records"] == 24
    steps = metrics(result.output_dir)
    assert all(abs(m["loss"] - m["kl"] - m["routing"]) < 1e-9 for m in steps)
    assert sum(m["routing"] for m in steps[-10:]) < 0.7 * sum(m["routing"] for m in steps[:10])
    report = json.loads((result.output_dir / REPORT_FILE).read_text())["settings"]
    assert (report["routing_weight"], report["positions"], report["weight_decay"]) == (1.0, "unrouted", 0.1)


def test_the_routing_term_is_the_cross_entropy_over_scored_positions_and_the_kl_skips_them(world, labelled):
    from xlora.train.distill import Batches, load_teacher, make_student, scalings_pair, step_loss
    from xlora.train.distill_losses import distill_kl
    from xlora.train.routing import routing_cross_entropy

    cfg = config(world, "parts", 2, train_file=labelled["train"], routing_weight=0.5, positions="unrouted")
    model, tokenizer = load_teacher(cfg)
    student = make_student(model, 2, "scratch")
    examples = build_dataset(labelled["train"], tokenizer, 512, routing_key="domain")[0]
    batch = Batches(0, model.xlora_config.expert_names, 8).collate(examples[40:52], model.device)  # 8 routed, 4 not
    assert int((batch["routing_target"].sum(-1) > 0).sum()) == 8
    with torch.no_grad():
        loss, parts = step_loss(model, student, cfg, batch)
        z_t, _, h_k = scalings_pair(model, student, batch)
        scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
        scored[:, :-1] = batch["labels"][:, 1:] != -100
        routed = batch["routing_target"].sum(-1, keepdim=True) > 0
        kl_mask = batch["attention_mask"].bool() & ~(scored & routed)
        kl = distill_kl(z_t, student.logits(h_k), kl_mask, model.xlora_config.softmax_temperature)
        ce = routing_cross_entropy(student(h_k), scored.long(), batch["routing_target"])
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-12) and parts["routing"] == pytest.approx(ce.item(), rel=1e-6)
    assert loss.item() == pytest.approx(kl.item() + 0.5 * ce.item(), rel=1e-6) and ce.item() > 0.1


@pytest.mark.parametrize("loss_kind", ["kl", "mse"])
def test_the_scored_term_adds_the_distillation_over_the_answer_positions(world, labelled, loss_kind):
    """loss = term over every real token + w · the same term over the scored positions only (by hand)."""
    from xlora.train.distill import Batches, load_teacher, make_student, scalings_pair, step_loss
    from xlora.train.distill_losses import distill_kl, distill_mse

    cfg = config(world, "scored_parts", 1, train_file=labelled["train"], scored_weight=2.0, loss=loss_kind)
    model, tokenizer = load_teacher(cfg)
    student = make_student(model, 1, "scratch")
    examples = build_dataset(labelled["train"], tokenizer, 512)[0]
    batch = Batches(0, None, 8).collate(examples[40:52], model.device)
    with torch.no_grad():
        loss, parts = step_loss(model, student, cfg, batch)
        z_t, s_t, h_k = scalings_pair(model, student, batch)
        scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
        scored[:, :-1] = batch["labels"][:, 1:] != -100
        tau = model.xlora_config.softmax_temperature
        term = (lambda m: distill_kl(z_t, student.logits(h_k), m, tau)) if loss_kind == "kl" else \
            (lambda m: distill_mse(s_t, student(h_k), m))
        every, answers = term(batch["attention_mask"]), term(scored & batch["attention_mask"].bool())
    assert 0 < int(scored.sum()) < int(batch["attention_mask"].sum())  # a strict subset of the tokens
    assert parts[loss_kind] == pytest.approx(every.item(), rel=1e-6)
    assert parts["scored"] == pytest.approx(answers.item(), rel=1e-6) and answers.item() != pytest.approx(every.item())
    assert loss.item() == pytest.approx(every.item() + 2.0 * answers.item(), rel=1e-6)


def test_routing_that_no_record_can_feed_is_refused_before_anything_is_written(world):
    with pytest.raises(ValueError, match=r"routing_weight=1.0 but no training record names an expert in 'domain'"):
        distill(config(world, "no_labels", 1, routing_weight=1.0))
    assert not (world["root"] / "no_labels").exists()


@pytest.mark.parametrize("field, value", [("scaling_pass_layers", 0), ("loss", "l1"), ("steps", 0), ("init", "zero"),
                                          ("learning_rate", 0.0), ("lm_weight", -1.0), ("batch_size", 0),
                                          ("positions", "prompt"), ("positions", "unrouted"), ("routing_weight", -1.0),
                                          ("weight_decay", -0.1), ("routing_key", ""), ("scored_weight", -1.0)])
def test_bad_values_are_refused_naming_the_field(world, field, value):
    kw = {"steps": 5, field: value}
    k = kw.pop("scaling_pass_layers", 1)
    with pytest.raises(ValueError, match=rf"^{field}\b.*{value!r}" if isinstance(value, str) else rf"^{field}\b"):
        config(world, "bad", k, **kw)


def test_a_device_torch_cannot_use_and_missing_files_are_refused_naming_the_setting(world):
    with pytest.raises(ValueError, match=r"^device must be a torch device such as 'cpu'.*got 'gpu'"):
        distill(config(world, "dev", 1, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device='cuda' but this torch .* has no CUDA device; use 'cpu'"):
            distill(config(world, "dev", 1, device="cuda"))
    with pytest.raises(FileNotFoundError, match=r"^eval_file \(--eval\) '.*nope\.jsonl' does not exist"):
        distill(config(world, "dev", 1, eval_file=str(world["root"] / "nope.jsonl")))
    assert not (world["root"] / "dev").exists()
    with pytest.raises(ValueError, match=r"^output_dir '.*train\.jsonl' is a file, not a folder"):
        DistillConfig(world["teacher"], world["train"], 1, world["train"])


def test_k_beyond_the_base_and_the_teachers_own_folder_are_refused(world):
    with pytest.raises(ValueError, match=r"scaling_pass_layers=3 exceeds the base model's 2 decoder layers; use 1..2"):
        distill(config(world, "too_deep", 3))
    assert not (world["root"] / "too_deep").exists()  # nothing written
    with pytest.raises(ValueError, match="output_dir=.* is the teacher's directory"):
        DistillConfig(world["teacher"], world["teacher"], 1, world["train"])


def test_the_cli_writes_the_student_directory(world, capsys):
    out = world["root"] / "cli"
    argv = ["distill", world["teacher"], str(out), "--layers", "1", "--data", world["train"], "--eval", world["eval"],
            "--steps", "3", "--batch-size", "4", "--lr", "0.01", "--loss", "mse", "--init", "scratch", "--no-chat"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "distilled 3 steps" in printed and str(out) in printed
    assert {"xlora_config.json", "xlora_head.safetensors", METRICS_FILE, REPORT_FILE, "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and all("mse" in m for m in metrics(out))
    report = json.loads((out / REPORT_FILE).read_text())["settings"]
    assert (report["loss"], report["init"], report["batch_size"], report["learning_rate"]) == ("mse", "scratch", 4, 0.01)
    assert XLoraModel.from_pretrained(out).xlora_config.scaling_pass_layers == 1
    assert main(argv) == 2  # a non-empty OUTPUT_DIR needs --overwrite
    assert "is not empty (and holds no checkpoint of this run to resume); pass overwrite=True (--overwrite)" in \
        capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_the_cli_passes_the_routing_flags_and_prints_the_routing(world, labelled, capsys):
    out = world["root"] / "cli_routing"
    argv = ["distill", world["teacher"], str(out), "--data", labelled["train"], "--eval",  # no --layers: all 2
            labelled["eval"], "--steps", "2", "--routing-weight", "0.5", "--routing-key", "domain", "--positions",
            "unrouted", "--weight-decay", "0.01", "--scored-weight", "0.25"]
    assert main(argv) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    settings, final = report["settings"], report["final"]
    assert (settings["routing_weight"], settings["routing_key"], settings["positions"], settings["weight_decay"],
            settings["scored_weight"]) == (0.5, "domain", "unrouted", 0.01, 0.25)
    assert all("scored" in m for m in metrics(out))
    assert settings["scaling_pass_layers"] == 2 and XLoraModel.from_pretrained(out).xlora_config.scaling_pass_layers is None
    assert f"own-expert routing {report['initial']['own_top1']:.3f} -> {final['own_top1']:.3f} (teacher " \
           f"{final['teacher_own_top1']:.3f}, 24 records)" in capsys.readouterr().out
    unweighted = [a for i, a in enumerate(argv) if "--routing-weight" not in argv[max(i - 1, 0):i + 1]]
    assert main([*unweighted, "--overwrite"]) == 2  # --positions unrouted without a routing weight
    assert "positions='unrouted' leaves the routed positions to routing_weight, which is 0" in capsys.readouterr().err


def test_a_stopped_run_resumes_to_the_same_head_and_metrics(world, capsys):
    """Stopped after step 1 of 6 (what SIGTERM asks for) and rerun: the same head, bit for bit, and the same
    metrics as an uninterrupted run, dropout included (its RNG travels with the checkpoint)."""
    from safetensors.torch import load_file

    from xlora.train.distill import CHECKPOINT_FILE
    from xlora.train.loop_checkpoint import STOP

    experts = {n: str(p) for n, p in world["setup"].expert_dirs.items()}
    config_ = XLoraConfig(experts=experts, head_depth=2, head_hidden_size=16, head_dropout=0.3)  # draws random numbers
    teacher = XLoraModel(world["setup"].base(), config_).eval()
    randomize_head(teacher, seed=6, std=0.7)
    teacher.save_pretrained(world["root"] / "teacher_dropout", bundle=True)
    kw = dict(teacher_dir=str(world["root"] / "teacher_dropout"), steps=6, save_every=2, learning_rate=5e-2)
    whole = distill(config(world, "whole", 1, **kw))
    STOP.set()
    try:
        with pytest.raises(SystemExit, match=r"distill stopped after step 1/6; rerun the same command to continue"):
            distill(config(world, "split", 1, **kw))
    finally:
        STOP.clear()
    split = world["root"] / "split"
    assert (split / CHECKPOINT_FILE).is_file() and [m["step"] for m in metrics(split)] == [1]
    with pytest.raises(ValueError, match="is not empty \\(and holds no checkpoint of this run to resume\\)"):
        distill(config(world, "split", 1, **{**kw, "learning_rate": 1e-2}))  # other settings: not this run
    rest = distill(config(world, "split", 1, **kw))
    assert "distill: resuming at step 1/6" in capsys.readouterr().out
    a, b = load_file(str(whole.output_dir / "xlora_head.safetensors")), load_file(str(split / "xlora_head.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(split) == metrics(whole.output_dir)
    assert rest.final == whole.final and not (split / CHECKPOINT_FILE).exists()
    assert not (whole.output_dir / CHECKPOINT_FILE).exists()  # removed once the run is complete


def test_a_crash_resumes_from_the_last_periodic_checkpoint(world, capsys, monkeypatch):
    """save_every=2 and a crash inside step 5 (no stop request): the checkpoint of step 4 is there, and the rerun
    continues from it to the uninterrupted run's head and metrics."""
    from safetensors.torch import load_file

    import xlora.train.distill as distill_module
    from xlora.train.distill import CHECKPOINT_FILE
    from xlora.train.distill_config import resume_settings
    from xlora.train.loop_checkpoint import saved_state

    kw = dict(steps=6, save_every=2, learning_rate=5e-2)
    whole = distill(config(world, "whole_crash", 1, **kw))
    calls, step_loss = [], distill_module.step_loss

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("power cut")
        return step_loss(*args, **kwargs)

    monkeypatch.setattr(distill_module, "step_loss", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        distill(config(world, "crash", 1, **kw))
    monkeypatch.undo()
    out = world["root"] / "crash"
    saved = saved_state(out / CHECKPOINT_FILE)
    assert saved["settings"] == resume_settings(config(world, "crash", 1, **kw)) and saved["step"] == 4
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    evaluations, evaluate = [], distill_module.evaluate_student
    monkeypatch.setattr(distill_module, "evaluate_student", lambda *a: evaluations.append(1) or evaluate(*a))
    rest = distill(config(world, "crash", 1, **kw))
    assert len(evaluations) == 1 and rest.initial == whole.initial  # the initial evaluation came with the checkpoint
    assert "distill: resuming at step 4/6" in capsys.readouterr().out
    a, b = load_file(str(whole.output_dir / "xlora_head.safetensors")), load_file(str(out / "xlora_head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and metrics(out) == metrics(whole.output_dir)


def test_a_killed_runs_later_and_cut_metrics_lines_are_dropped_on_resume(world):
    """A kill after the checkpoint of step 2 may leave step 3's line and half of step 4's: the resumed run keeps
    exactly steps 1-2 from the file, and ends with the uninterrupted run's metrics."""
    from xlora.train.distill import CHECKPOINT_FILE
    from xlora.train.loop_checkpoint import STOP

    kw = dict(steps=5, save_every=0, learning_rate=5e-2)
    whole = distill(config(world, "whole_cut", 1, **kw))
    out = world["root"] / "cut"
    for _ in range(2):  # a stop request checkpoints even with save_every=0: after step 1, then after step 2
        STOP.set()
        try:
            with pytest.raises(SystemExit, match="stopped after step"):
                distill(config(world, "cut", 1, **kw))
        finally:
            STOP.clear()
    assert [m["step"] for m in metrics(out)] == [1, 2] and (out / CHECKPOINT_FILE).is_file()
    lines = (out / METRICS_FILE).read_text()
    (out / METRICS_FILE).write_text(lines + json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    distill(config(world, "cut", 1, **kw))
    assert metrics(out) == metrics(whole.output_dir)


def test_a_changed_teacher_or_data_file_is_another_run(world, tmp_path):
    from xlora.train.distill import resume_settings

    data = tmp_path / "train.jsonl"
    data.write_text(Path(world["train"]).read_text())
    first = resume_settings(config(world, "x", 1, train_file=str(data)))
    assert resume_settings(config(world, "x", 1, train_file=str(data))) == first
    data.write_text(Path(world["train"]).read_text() + json.dumps({"text": "one more"}) + "\n")
    assert resume_settings(config(world, "x", 1, train_file=str(data)))["inputs_sha256"] != first["inputs_sha256"]



def test_the_teachers_experts_count_in_its_fingerprint_and_its_run_logs_do_not(world, tmp_path):
    import shutil

    from xlora.train.distill import resume_settings

    teacher = tmp_path / "teacher"
    shutil.copytree(world["teacher"], teacher)
    first = resume_settings(config(world, "x", 1, teacher_dir=str(teacher)))["inputs_sha256"]
    (teacher / "training.json").write_text("{}")  # a pipeline's log beside the model
    (teacher / "head_metrics.jsonl").write_text("{}\n")
    assert resume_settings(config(world, "x", 1, teacher_dir=str(teacher)))["inputs_sha256"] == first
    experts = json.loads((teacher / "xlora_config.json").read_text())["experts"]
    weights = teacher / next(iter(experts.values())) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # another expert: another teacher
    assert resume_settings(config(world, "x", 1, teacher_dir=str(teacher)))["inputs_sha256"] != first


def test_distill_help_imports_no_torch():
    code = ("import sys\nfrom xlora.cli import main\ntry:\n    main(['distill', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.splitlines()[-1] == "HEAVY []" and "--layers K" in proc.stdout
