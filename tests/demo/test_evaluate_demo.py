"""The demo's evaluation is a caller of the engine: its table equals ``xlora eval MODEL_DIR --data FILE`` on
the same records, and it can show the engine's oracle and Arrow rows (tiny Llama, PEFT experts)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import demo_model
from transformers import AutoModelForCausalLM

from xlora.analysis.evaluate import EvalConfig, evaluate_files
from xlora.demo import domains
from xlora.demo.evaluate import chat_messages, evaluate, write_records
from xlora.train.data import tokenize_record

DOMS = ["mathematics", "general"]  # need neither RDKit nor Biopython
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_eval")
    model, tok, _, _ = demo_model(root, DOMS, head_depth=1)
    return model, tok, root


def fresh_base(root):
    return lambda: AutoModelForCausalLM.from_pretrained(root / "base").eval()


def test_demo_table_equals_the_engine_on_the_exported_records(demo, tmp_path):
    model, tok, root = demo
    configs = ["base", *DOMS, "uniform", "oracle", "arrow", "xlora"]
    table = evaluate(model, tok, "test_unseen", 3, n_generate=0, domain_names=DOMS, configs=configs,
                     arrow_base=fresh_base(root))
    path = write_records(tmp_path / "heldout.jsonl", "test_unseen", 3, domain_names=DOMS)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    records = domains.generate_mixture("test_unseen", 3, domains=DOMS)
    assert lines == [{"messages": chat_messages(r), "domain": r["domain"]} for r in records]
    result = evaluate_files(model, tok, [path], EvalConfig(arrow_top_k=2), tokenize_record=tokenize_record, arrow_base=fresh_base(root),
                            progress=False)
    assert table.configs == configs == list(result.configs)
    for c in configs:
        assert table.loss[c] == pytest.approx(result.configs[c]["loss"], abs=1e-6), c
    assert table.tokens == result.configs["xlora"]["tokens"]
    for d in DOMS:
        assert table.routing[d] == pytest.approx(result.routing["mean"][d], abs=1e-6)
    assert table.routing_top1 == result.routing["top1_own"]
    assert table.routing_top1_first == result.routing["top1_own_first"] and set(table.routing_top1_first) == set(DOMS)
    # the oracle row is each domain's own expert; the targets ignore oracle and arrow (not single experts)
    assert table.loss["oracle"]["general"] == table.loss["general"]["general"]
    single = min(table.loss[c]["mixed"] for c in DOMS)
    targets = {what: (value, bound) for what, value, bound, _ in table.targets()}
    assert targets["mixed loss - best single expert's"][0] == pytest.approx(table.loss["xlora"]["mixed"] - single)
    x = table.loss["xlora"]["mixed"]
    assert targets["mixed loss / uniform's"] == (pytest.approx(x / table.loss["uniform"]["mixed"]), 0.85)
    assert targets["mixed loss / oracle's"] == (pytest.approx(x / table.loss["oracle"]["mixed"]), 1.0)
    md = table.to_markdown()
    assert "| oracle |" in md and "| arrow |" in md
    # the targets carry the engine's intervals: the same numbers as xlora eval's on the same records
    assert table.intervals["loss_ratio"] == result.intervals["loss_ratio"]
    ratio, low, high = table.intervals["loss_ratio"]["oracle"]["mixed"]
    assert ratio == pytest.approx(x / table.loss["oracle"]["mixed"], rel=1e-9)
    assert f"- mixed loss / oracle's: {ratio:.3f} [{low:.3f}, {high:.3f}] (bound 1)" in md
    w = table.intervals["top1_own"]["general"]
    assert f"- top-1 routing general: {table.routing_top1['general']:.3f} [{w[0]:.2f}, {w[1]:.2f}]" in md
    assert f"| mathematics | {table.routing['mathematics']['mathematics']:.3f} |" in md
    first = table.routing_top1_first
    assert "| first position | " + " | ".join(f"{first[d]:.3f}" for d in table.routing_top1) + " |" in md


def test_demo_answers_are_scored_by_the_demo_checker(demo):
    model, tok, _ = demo
    table = evaluate(model, tok, "test", 2, n_generate=1, domain_names=DOMS, max_new_tokens=3)
    assert [s["config"] for s in table.samples] == [c for c in table.configs for _ in DOMS]
    for c in table.configs:
        mine = [s for s in table.samples if s["config"] == c]
        assert table.score[c]["mixed"] == pytest.approx(sum(s["score"] for s in mine) / 2)
        by_id = {r["id"]: r for r in domains.generate_mixture("test", 2, domains=DOMS)}
        assert all(s["score"] == domains.check(by_id[s["id"]], s["answer"]) for s in mine)
    assert torch.get_num_threads() == 1
