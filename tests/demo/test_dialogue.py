"""``xlora dialogue`` on a tiny Llama with two PEFT experts: greedy turns are deterministic and equal to
decoding each turn's prompt by hand, the context stays within its budget with the system prompt kept,
and every turn's scalings are the recorder's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_TARGETS, make_expert, randomize_head, tiny_model, tiny_tokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.demo.dialogue import OPENING, REPETITION_PENALTY, converse, fit_context, view, write_dialogue
from xlora.generation import StepRecorder

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["graph", "general"]


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("dialogue")
    experts = {n: str(make_expert(base, root / n, r=4, alpha=8, targets=LLAMA_TARGETS, seed=i + 1))
               for i, n in enumerate(NAMES)}
    model = XLoraModel(base, XLoraConfig(experts=experts, head_depth=1)).eval()
    randomize_head(model, 0, 0.5)  # a router that moves with the context
    return model, tiny_tokenizer()


def test_turns_are_deterministic_and_equal_decoding_each_prompt_by_hand(model_tok):
    model, tok = model_tok
    a = converse(model, tok, "silk", turns=4, agent_a="Ask.", agent_b="Criticise.", max_new_tokens=6, max_context=250)
    b = converse(model, tok, "silk", turns=4, agent_a="Ask.", agent_b="Criticise.", max_new_tokens=6, max_context=250)
    assert a.to_dict() == b.to_dict()
    assert [t.agent for t in a.turns] == ["A", "B", "A", "B"] and all(t.new_tokens <= 6 for t in a.turns)
    assert a.repetition_penalty == REPETITION_PENALTY == 1.3
    history = []
    for t in a.turns:  # replay: the same prompt decoded greedily with a fresh recorder gives the same turn
        system = "Ask." if t.agent == "A" else "Criticise."
        enc, _ = fit_context(tok, view(t.agent, system, "silk", history), 250 - 6)
        rec = StepRecorder()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2, observer=rec,
                                 repetition_penalty=1.3)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert tok.decode(new, skip_special_tokens=True).strip() == t.text and len(new) == t.new_tokens
        per_token = rec.per_token(len(new)).float().mean(1)  # [n, E]
        assert list(t.mean_scalings.values()) == pytest.approx(per_token.mean(0).tolist(), abs=1e-6)
        assert sum(t.mean_scalings.values()) == pytest.approx(1.0, abs=1e-5)
        assert t.dominant == NAMES[int(per_token.mean(0).argmax())]
        assert sum(t.token_dominant.values()) == len(new)
        history.append((t.agent, t.text))


def test_the_views_alternate_roles_and_a_opens_with_the_topic():
    history = [("A", "q1"), ("B", "a1"), ("A", "q2")]
    va = view("A", "sysA", "silk", history)
    vb = view("B", "sysB", "silk", history)
    assert [m["role"] for m in va] == ["system", "user", "assistant", "user", "assistant"]
    assert va[1]["content"] == OPENING.format(topic="silk")
    assert [m["role"] for m in vb] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in vb] == ["sysB", "q1", "a1", "q2"]


def test_context_is_bounded_and_truncated_from_the_start_with_the_system_prompt_kept(model_tok):
    model, tok = model_tok
    dialogue = converse(model, tok, "a long topic " * 3, turns=10, agent_a="SYSTEM-A", agent_b="SYSTEM-B",
                        max_new_tokens=12, max_context=120)
    budget = 120 - 12
    assert all(t.prompt_tokens <= budget for t in dialogue.turns)
    assert dialogue.turns[-1].dropped_turns > 0  # the conversation outgrew the budget: old turns went first
    dropped = [t.dropped_turns for t in dialogue.turns]
    assert dropped[:2] == [0, 0] and max(dropped) >= 2
    messages = [{"role": "system", "content": "SYSTEM-A"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 30} for i in range(13)]
    enc, n = fit_context(tok, messages, 100)
    text = tok.decode(enc["input_ids"][0])
    assert enc["input_ids"].shape[1] <= 100 and text.startswith("<system>SYSTEM-A</s>") and n > 0
    assert "turn 12" in text and "turn 0 " not in text  # the newest turn kept, the oldest dropped
    assert text.split("</s>")[1].startswith("<user>")  # the kept history starts with the other speaker
    long = [{"role": "system", "content": "S"}, {"role": "user", "content": "y" * 50 + "THE-END"}]
    enc, _ = fit_context(tok, long, 40)  # one message over the budget keeps its last tokens
    text = tok.decode(enc["input_ids"][0])
    assert enc["input_ids"].shape[1] <= 40 and text.startswith("<system>S</s>") and "THE-END" in text
    with pytest.raises(ValueError, match="system prompt alone"):
        fit_context(tok, [{"role": "system", "content": "z" * 80}, {"role": "user", "content": "hi"}], 40)


def test_outputs_transcript_json_and_plot(model_tok, tmp_path):
    pytest.importorskip("matplotlib")
    model, tok = model_tok
    dialogue = converse(model, tok, "nacre", turns=3, agent_a="Ask.", agent_b="Answer.", max_new_tokens=5,
                        max_context=200)
    paths = write_dialogue(dialogue, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["topic"] == "nacre" and doc["experts"] == NAMES and len(doc["turns"]) == 3
    assert [t["mean_scalings"] for t in doc["turns"]] == [t.mean_scalings for t in dialogue.turns]
    md = paths["transcript"].read_text()
    assert md.startswith("# Dialogue: nacre") and md.count("**A** (turn") == 2 and md.count("**B** (turn") == 1
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_models_and_bad_arguments(model_tok, tmp_path):
    model, tok = model_tok
    other = XLoraModel(tiny_model("llama"), XLoraConfig(experts=model.xlora_config.experts, head_depth=1)).eval()
    with torch.no_grad():
        for p in other.head.parameters():
            p.zero_()  # agent B's router: uniform scalings
    d = converse(model, tok, "bone", turns=2, max_new_tokens=4, max_context=300, agent_a="a", agent_b="b", model_b=other)
    b = d.turns[1]
    assert b.new_tokens > 0 and b.mean_scalings == pytest.approx({n: 0.5 for n in NAMES})  # B spoke with its model
    with pytest.raises(ValueError, match="max_context"):
        converse(model, tok, "x", max_new_tokens=10, max_context=10)
    with pytest.raises(ValueError, match="turns"):
        converse(model, tok, "x", turns=0)
    assert view("A", "s", "x", []) == [{"role": "system", "content": "s"},
                                       {"role": "user", "content": OPENING.format(topic="x")}]


def test_the_repetition_penalty_is_applied_recorded_and_checked(model_tok, tmp_path):
    """Greedy turns echo the other agent's last turn on the demo model (the README's spider-silk example went
    'spider silk is made of spider silk', then 'spider silk' four times); the penalty is transformers' own."""
    model, tok = model_tok
    kw = dict(turns=1, agent_a="Ask.", max_new_tokens=24, max_context=250)
    plain = converse(model, tok, "silk", repetition_penalty=1.0, **kw).turns[0]
    enc, _ = fit_context(tok, view("A", "Ask.", "silk", []), 250 - 24)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=2)
    new = ref[0, enc["input_ids"].shape[1]:].tolist()
    new = new[: new.index(2)] if 2 in new else new
    assert plain.text == tok.decode(new, skip_special_tokens=True).strip()  # 1.0: plain greedy decoding
    strong = converse(model, tok, "silk", repetition_penalty=50.0, **kw)
    pieces = tok.convert_ids_to_tokens(tok(strong.turns[0].text, add_special_tokens=False)["input_ids"])
    assert strong.turns[0].new_tokens > 0 and len(pieces) == len(set(pieces))  # no token of the answer twice
    assert strong.repetition_penalty == 50.0
    md = write_dialogue(strong, tmp_path)["transcript"].read_text()
    assert "- greedy, repetition penalty 50; each turn's mixture is the mean over the tokens it wrote" in md
    for bad in (0, -1.0, True, "1.3"):
        with pytest.raises(ValueError, match=rf"repetition_penalty={bad!r} must be a number > 0 \(1.0 is plain"):
            converse(model, tok, "x", repetition_penalty=bad)
