"""Routing supervision: targets from records, the cross-entropy by hand, and a head that follows its labels."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from xlora import XLoraModel
from xlora.train.config import TrainConfig, resume_conflicts
from xlora.train.data import IGNORE_INDEX, TokenizedExample, build_dataset, collate
from xlora.train.losses import loss_tokens, with_routing_mask, without_routed_lm
from xlora.train.routing import check_routing_targets, record_target, routing_cross_entropy, routing_targets
from xlora.train.trainer import TrainingError, train

EXPERTS = ("lower", "digit", "upper")
ALPHABETS = {"lower": "abcdefghijklmnopqrstuvwxyz", "digit": "0123456789", "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


# ------------------------------------------------------------------------------------ the term by hand
def test_cross_entropy_equals_a_hand_computation_with_padding_and_a_two_expert_target():
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(3, 4, 2, 3, generator=g), dim=-1)  # [b=3, t=4, L=2, E=3]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    target = routing_targets([("lower",), ("digit", "upper"), ("nobody",)], list(EXPERTS))
    assert target.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]

    def by_hand(i: int) -> float:
        real = [t for t in range(4) if mask[i, t]]
        p = [sum(float(s[i, t, l, e]) for t in real for l in range(2)) / (2 * len(real)) for e in range(3)]
        return -sum(float(target[i, e]) * math.log(p[e]) for e in range(3))

    expected = [by_hand(0), by_hand(1)]  # the third example has no target: no loss
    assert float(routing_cross_entropy(s, mask, target, reduction="sum")) == pytest.approx(sum(expected), abs=1e-6)
    assert float(routing_cross_entropy(s, mask, target)) == pytest.approx(sum(expected) / 2, abs=1e-6)
    # padding is ignored: changing the scalings of padded tokens changes nothing
    s2 = s.clone()
    s2[0, 2:] = torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(routing_cross_entropy(s2, mask, target), routing_cross_entropy(s, mask, target))
    # a batch without any target: 0, not a division by zero
    assert float(routing_cross_entropy(s, mask, torch.zeros(3, 3))) == 0.0


def test_scored_routing_averages_only_the_positions_that_predict_completion_tokens():
    g = torch.Generator().manual_seed(1)
    s = torch.softmax(torch.randn(3, 5, 2, 3, generator=g), dim=-1)  # [b=3, t=5, L=2, E=3]
    x = IGNORE_INDEX
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[x, x, 7, 8, x], [x, x, x, x, 9], [x, x, x, x, x]]),
             "routing_target": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}
    scored = with_routing_mask(batch, "scored")
    # position t predicts token t + 1: row 0 routes on positions 1, 2; row 1 on 3; row 2 has no scored token
    assert scored["routing_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert scored["routing_target"].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    expected = -(math.log(float(s[0, 1:3, :, 0].mean())) + math.log(float(s[1, 3, :, 1].mean())))
    got = routing_cross_entropy(s, scored["routing_mask"], scored["routing_target"], reduction="sum")
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # the term itself gives a row without a routed token no loss, even with its target kept
    assert torch.equal(routing_cross_entropy(s, scored["routing_mask"], batch["routing_target"], reduction="sum"), got)
    # the prompt's scalings do not enter the scored term
    s2 = s.clone()
    s2[:, 0] = torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(routing_cross_entropy(s2, scored["routing_mask"], scored["routing_target"]),
                       routing_cross_entropy(s, scored["routing_mask"], scored["routing_target"]))
    everything = with_routing_mask(batch, "all")
    assert torch.equal(everything["routing_mask"], batch["attention_mask"])
    assert torch.equal(everything["routing_target"], batch["routing_target"])
    no_target = {k: v for k, v in batch.items() if k != "routing_target"}
    assert with_routing_mask(no_target, "scored") is no_target
    with pytest.raises(ValueError, match=r"routing_tokens must be one of \('all', 'scored'\), got 'answer'"):
        with_routing_mask(batch, "answer")


def test_unrouted_lm_masks_exactly_the_labels_of_the_routed_examples():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8, 9], [IGNORE_INDEX, 4, 4, 4],
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    batch = {"input_ids": torch.ones(4, 4, dtype=torch.long), "attention_mask": torch.ones(4, 4, dtype=torch.long),
             "labels": labels, "routing_target": torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5], [0, 0, 0], [0, 1.0, 0]])}
    scored = with_routing_mask(batch, "scored")  # row 3 has no scored position: its target is dropped
    out = without_routed_lm(scored)
    assert out["labels"].tolist() == [[IGNORE_INDEX] * 4, [IGNORE_INDEX] * 4, [IGNORE_INDEX, 4, 4, 4],
                                      [IGNORE_INDEX] * 4]
    assert loss_tokens(out) == 3 and loss_tokens(batch) == 8
    assert torch.equal(out["routing_mask"], scored["routing_mask"]) and torch.equal(batch["labels"], labels)
    no_target = {k: v for k, v in batch.items() if k != "routing_target"}
    assert without_routed_lm(no_target) is no_target


def test_targets_from_records():
    assert record_target({"domain": "lower"}, "domain") == ("lower",)
    assert record_target({"domain": "composite", "experts": ["lower", "digit"]}, "domain") == ("lower", "digit")
    assert record_target({"text": "x"}, "domain") == ()
    assert record_target({"topic": "upper", "domain": "lower"}, "topic") == ("upper",)
    with pytest.raises(ValueError, match="field 'experts' must be a list of expert names"):
        record_target({"experts": "lower"}, "domain")
    with pytest.raises(ValueError, match=r"field 'domain' \(routing_key\) must be an expert name.*got 3"):
        record_target({"domain": 3}, "domain")
    # a list naming a non-expert has no target (a partial one would be a wrong one)
    assert routing_targets([("lower", "chemistry"), ()], list(EXPERTS)).sum() == 0


def test_no_record_naming_an_expert_is_refused_with_the_names_found():
    assert check_routing_targets([("lower",), ("other",), ()], list(EXPERTS), "domain", 1.0) == 2
    with pytest.raises(ValueError, match=r"routing_weight=1.0 but no training record names an expert in 'domain'.*"
                                         r"found are \['chemistry', 'physics'\] and the experts are "
                                         r"\['lower', 'digit', 'upper'\].*routing_weight=0"):
        check_routing_targets([("chemistry",), ("physics",), ()], list(EXPERTS), "domain", 1.0)


def test_targets_travel_to_the_batch_only_when_asked(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "abc", "domain": "lower"}, {"text": "12", "domain": "composite", "experts": ["digit", "upper"]},
        {"text": "??"}]))
    plain, _ = build_dataset(path, tok, 16)
    routed, _ = build_dataset(path, tok, 16, routing_key="domain")
    assert [e.target for e in plain] == [(), (), ()]
    assert [e.target for e in routed] == [("lower",), ("digit", "upper"), ()]
    assert [(e.input_ids, e.labels) for e in plain] == [(e.input_ids, e.labels) for e in routed]
    batch = collate(routed, 0, experts=list(EXPERTS))
    assert batch["routing_target"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]
    assert set(collate(routed, 0)) == {"input_ids", "attention_mask", "labels"}
    for key, value in collate(plain, 0, side="left").items():
        assert torch.equal(value, collate(routed, 0, side="left", experts=list(EXPERTS))[key])
    assert TokenizedExample([1], [1]).target == ()


# ------------------------------------------------------------------------------------ config
def test_bad_routing_options_name_the_field(tmp_path):
    base = dict(base_model="m", train_file="t.jsonl", output_dir=str(tmp_path), experts={"lower": "a"})
    with pytest.raises(ValueError, match=r"routing_weight must be >= 0, got -0.5"):
        TrainConfig.from_dict({**base, "routing_weight": -0.5})
    with pytest.raises(ValueError, match=r"routing_weight must be a finite number, got 'x'"):
        TrainConfig.from_dict({**base, "routing_weight": "x"})
    with pytest.raises(ValueError, match=r"routing_key must be the name of a record field.*got ''"):
        TrainConfig.from_dict({**base, "routing_key": ""})
    with pytest.raises(ValueError, match=r"routing_weight=1.0 needs one record per example, but packing=True"):
        TrainConfig.from_dict({**base, "routing_weight": 1, "packing": True})
    with pytest.raises(ValueError, match=r"routing_weight=1.0 needs enable_softmax=True"):
        TrainConfig.from_dict({**base, "routing_weight": 1, "enable_softmax": False})
    with pytest.raises(ValueError, match=r"routing_tokens must be one of \('all', 'scored'\), got 'prompt': 'scored'"):
        TrainConfig.from_dict({**base, "routing_tokens": "prompt"})
    assert TrainConfig.from_dict({**base, "packing": True}).routing_weight == 0.0


def test_bad_lm_examples_name_the_field(tmp_path):
    base = dict(base_model="m", train_file="t.jsonl", output_dir=str(tmp_path), experts={"lower": "a"})
    with pytest.raises(ValueError, match=r"lm_examples must be one of \('all', 'unrouted'\), got 'routed'"):
        TrainConfig.from_dict({**base, "routing_weight": 1.0, "lm_examples": "routed"})
    with pytest.raises(ValueError, match=r"lm_examples='unrouted' leaves the routed examples to routing_weight, "
                                         r"which is 0"):
        TrainConfig.from_dict({**base, "lm_examples": "unrouted"})
    saved = TrainConfig.from_dict({**base, "routing_weight": 1.0}).to_dict()
    del saved["lm_examples"]  # recorded before the option: every example took the next-token loss
    assert resume_conflicts(saved, TrainConfig.from_dict({**base, "routing_weight": 1.0})) == []
    assert resume_conflicts(saved, TrainConfig.from_dict({**base, "routing_weight": 1.0, "lm_examples": "unrouted"})) \
        == ["lm_examples 'all' -> 'unrouted'"]


def test_a_run_recorded_before_routing_tokens_resumes_only_with_all(tmp_path):
    base = dict(base_model="m", train_file="t.jsonl", output_dir=str(tmp_path), experts={"lower": "a"},
                routing_weight=1.0)
    saved = TrainConfig.from_dict(base).to_dict()
    del saved["routing_tokens"]  # a train_config.json written before the option existed: it averaged every token
    assert resume_conflicts(saved, TrainConfig.from_dict(base)) == []
    assert resume_conflicts(saved, TrainConfig.from_dict({**base, "routing_tokens": "scored"})) == [
        "routing_tokens 'all' -> 'scored'"]


# ------------------------------------------------------------------------------------ training
def text(domain: str, rng: random.Random, length: int = 16) -> str:
    alphabet = ALPHABETS[domain]
    start, stride = rng.randrange(len(alphabet)), rng.choice([1, 2])
    return "".join(alphabet[(start + i * stride) % len(alphabet)] for i in range(length))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base and three experts that are random LoRA weights: the language-model loss alone gives the head no
    reason to route a domain to the expert of its name, so only the labels can teach it."""
    root = tmp_path_factory.mktemp("routing_supervision")
    base, tok = tiny_model("llama"), tiny_tokenizer()
    base.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    experts = {}
    for i, name in enumerate(EXPERTS):
        torch.manual_seed(100 + i)
        peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                              target_modules=["q_proj", "v_proj"]))
        peft.save_pretrained(str(root / name))
        experts[name] = str(root / name)
    rng = random.Random(0)
    records = [{"text": text(d, rng), "domain": d} for d in EXPERTS for _ in range(30)]
    records += [{"text": text("lower", rng) + text("digit", rng, 8), "domain": "composite",
                 "experts": ["lower", "digit"]} for _ in range(4)]
    records += [{"text": text("upper", rng), "domain": "other"} for _ in range(3)]  # no target
    rng.shuffle(records)
    labelled, plain = root / "train.jsonl", root / "plain.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
    held_out = {d: [text(d, rng) for _ in range(12)] for d in EXPERTS}
    return {"root": root, "base": str(root / "base"), "experts": experts, "train": str(labelled),
            "plain": str(plain), "held_out": held_out, "tok": tok}


def config(world, out: Path, **kw) -> TrainConfig:
    opts = dict(base_model=world["base"], train_file=world["train"], output_dir=str(out), experts=world["experts"],
                max_length=24, per_device_batch_size=8, learning_rate=2e-2, max_steps=30, save_every=10, log_every=5,
                progress=False, head_dropout=0.0, head_hidden_size=32, seed=1)
    opts.update(kw)
    return TrainConfig.from_dict(opts)


def head_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "xlora_head.safetensors"))


def own_expert_share(out: Path, world) -> dict[str, float]:
    """Per domain: the mean scaling (over held-out examples, tokens and layers) of the domain's own expert."""
    model = XLoraModel.from_pretrained(out).eval()
    shares = {}
    for e, domain in enumerate(EXPERTS):
        enc = world["tok"](world["held_out"][domain], return_tensors="pt")
        with torch.no_grad():
            s = model(input_ids=enc["input_ids"]).scalings  # [b, t, L, E]
        shares[domain] = float(s.mean(dim=(0, 1, 2))[e])
    return shares


def test_weight_zero_is_the_default_path_bit_for_bit(world, tmp_path):
    train(config(world, tmp_path / "default", max_steps=6))
    train(config(world, tmp_path / "zero", max_steps=6, routing_weight=0.0, routing_key="nothing"))
    train(config(world, tmp_path / "plain", max_steps=6, train_file=world["plain"]))
    default = head_of(tmp_path / "default")
    for other in ("zero", "plain"):
        head = head_of(tmp_path / other)
        assert list(head) == list(default)
        assert all(torch.equal(head[k], default[k]) for k in default), other
    assert all("routing_loss" not in json.loads(line)
               for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines())


def test_supervision_routes_each_domain_to_its_expert(world, tmp_path, capsys):
    train(config(world, tmp_path / "off", learning_rate=1e-1))
    train(config(world, tmp_path / "on", learning_rate=1e-1, routing_weight=1.0))
    assert "routing supervision (weight 1.0): 3 of 97 training examples name no expert" in capsys.readouterr().out
    off, on = own_expert_share(tmp_path / "off", world), own_expert_share(tmp_path / "on", world)
    print("own-expert share, routing_weight=0:", off, "routing_weight=1:", on)
    assert min(on.values()) > 0.6, on
    assert min(off.values()) < 0.6, off
    records = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    routing = [r["routing_loss"] for r in records if "routing_loss" in r]
    # logged every 5 steps (one step's batch each): well under log(3), the cross-entropy of uniform scalings
    assert len(routing) == 6 and max(routing[1:]) < 0.75 * math.log(3), routing
    # resuming with another routing setting is refused; the same one continues
    with pytest.raises(TrainingError, match=r"routing_weight 1.0 -> 0.5"):
        train(config(world, tmp_path / "on", routing_weight=0.5, resume=True, max_steps=31))
    with pytest.raises(TrainingError, match=r"routing_key 'domain' -> 'topic'"):
        train(config(world, tmp_path / "on", routing_weight=1.0, routing_key="topic", resume=True, max_steps=31))
    assert train(config(world, tmp_path / "on", learning_rate=1e-1, routing_weight=1.0, resume=True,
                        max_steps=31)).steps == 31


def test_weight_without_any_labelled_record_is_refused_before_writing(world, tmp_path):
    with pytest.raises(ValueError, match=r"no training record names an expert in 'domain'.*found are \[\]"):
        train(config(world, tmp_path / "run", train_file=world["plain"], routing_weight=1.0))
    assert not (tmp_path / "run").exists()


def test_unrouted_lm_trains_the_routed_examples_by_their_labels_alone(world, tmp_path):
    """Every record of the file is routed: with ``lm_examples="unrouted"`` no example takes the next-token loss
    (the logged loss is exactly 0 at every step) and the head still learns each domain's expert from its label."""
    rng = random.Random(1)
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({"text": text(d, rng), "domain": d}) + "\n" for d in EXPERTS for _ in range(30)))
    out = tmp_path / "run"
    train(config(world, out, train_file=str(routed), learning_rate=1e-1, routing_weight=1.0, lm_examples="unrouted"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "routing_loss" in r] == [0.0] * 6
    assert min(own_expert_share(out, world).values()) > 0.6
