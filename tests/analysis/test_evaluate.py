"""The evaluation engine on a tiny Llama with three PEFT experts: every row against an independent
computation, PEFT's own Arrow model, padding, routing, the JSON schema, answers and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_expert, randomize_head, tiny_model, tiny_tokenizer
from peft import ArrowConfig, PeftModel, create_arrow_model
from transformers import AutoModelForCausalLM

from xlora import XLoraConfig, XLoraModel
from xlora.analysis.eval_answers import greedy_answers
from xlora.analysis.eval_data import BadRecord, iter_eval_records
from xlora.analysis.evaluate import EvalConfig, check_answer
from xlora.analysis.evaluate import evaluate_files as engine_files
from xlora.analysis.stats import token_entropy
from xlora.train.data import tokenize_record

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["alpha", "beta", "gamma"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
RECORDS = [
    {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}], "domain": "alpha",
     "check": {"exact": True}},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "pi?"},
                  {"role": "assistant", "content": "3.14159"}], "domain": "beta", "check": {"rel_tol": 0.01}},
    {"prompt": "Name a colour: ", "completion": "blue", "domain": "gamma"},
    {"prompt": "1.5 + 1 = ", "completion": "2.5", "domain": "alpha", "check": {"abs_tol": 0.1}},
    {"messages": [{"role": "user", "content": "What is a cell made of?"},
                  {"role": "assistant", "content": "molecules"}], "domain": "beta"},
    {"prompt": "x", "completion": "a longer completion here", "domain": "gamma"},
    {"text": "plain text is scored on every token", "domain": "delta"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_model("llama")
    base.save_pretrained(root / "base")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "base")
    experts = {n: str(make_expert(base, root / n, r=4, alpha=8, targets=TARGETS, seed=i + 1))
               for i, n in enumerate(NAMES)}
    model = XLoraModel(AutoModelForCausalLM.from_pretrained(root / "base"), XLoraConfig(experts=experts,
                                                                                        head_depth=1)).eval()
    randomize_head(model, std=1.0)
    model.save_pretrained(root / "xlora")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return model, tok, root, experts, data


def evaluate_files(model, tok, paths, config=None, **kwargs):
    """The engine on files, parsed by the trainer's tokenize_record (what the CLI hands in)."""
    return engine_files(model, tok, paths, config, tokenize_record=tokenize_record, **kwargs)


def fresh_base(root):
    return lambda: AutoModelForCausalLM.from_pretrained(root / "base").eval()


def scored(tok, record, chat=True):
    """Independent of eval_data: ids and labels of one record, built from the chat template by hand."""
    if "text" in record:
        ids = tok(record["text"])["input_ids"] + [tok.eos_token_id]
        return ids, list(ids)
    if "prompt" in record and not chat:
        p = tok(record["prompt"])["input_ids"]
        c = tok(record["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return p + c, [-100] * len(p) + c
    msgs = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                      {"role": "assistant", "content": record["completion"]}]
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])  # character-level: prefixes tokenize alike
    return ids, [-100] * n + ids[n:]


def direct(model, tok, records, run, chat=True):
    """Summed NLL and scored tokens per domain, one unpadded record at a time, with HF's own loss."""
    sums, counts = {}, {}
    for r in records:
        ids, labels = scored(tok, r, chat)
        n = sum(t != -100 for t in labels[1:])
        with torch.no_grad():
            loss = run(r, torch.tensor([ids]), torch.tensor([labels])).loss.item()
        sums[r["domain"]] = sums.get(r["domain"], 0.0) + loss * n
        counts[r["domain"]] = counts.get(r["domain"], 0) + n
    return sums, counts


@pytest.fixture(scope="module")
def result(setup):
    model, tok, root, _, data = setup
    return evaluate_files(model, tok, [data], EvalConfig(batch_size=3, arrow_top_k=2), arrow_base=fresh_base(root),
                          model_name="tiny", progress=False)


def test_every_row_equals_model_with_those_scalings(setup, result):
    model, tok, *_ = setup
    specs = {"base": "zero", "alpha": "alpha", "beta": "beta", "gamma": "gamma", "uniform": "uniform", "xlora": None}
    assert list(result.configs) == ["base", *NAMES, "uniform", "oracle", "arrow", "xlora"]
    for row, spec in specs.items():
        sums, counts = direct(model, tok, RECORDS, lambda r, i, lab, s=spec: model(input_ids=i, labels=lab, scalings=s))
        assert result.configs[row]["tokens"] == counts
        for d in counts:
            assert result.configs[row]["loss"][d] == pytest.approx(sums[d] / counts[d], abs=1e-5), (row, d)
        assert result.configs[row]["loss"]["mixed"] == pytest.approx(sum(sums.values()) / sum(counts.values()),
                                                                     abs=1e-5)
    # the oracle scores each record with its own domain's expert; 'delta' names no expert and is left out
    own = [r for r in RECORDS if r["domain"] in NAMES]
    sums, counts = direct(model, tok, own, lambda r, i, lab: model(input_ids=i, labels=lab, scalings=r["domain"]))
    oracle = result.configs["oracle"]
    assert oracle["tokens"] == counts and "delta" not in oracle["loss"]
    assert oracle["loss"]["mixed"] == pytest.approx(sum(sums.values()) / sum(counts.values()), abs=1e-5)
    for d in NAMES:
        assert oracle["loss"][d] == pytest.approx(result.configs[d]["loss"][d], abs=1e-6)
    assert result.notes == ["oracle: domains ['delta'] name no expert; their records are not in the oracle row"]


def test_x_lora_takes_its_scaling_pass_from_the_base_rows_forward(setup):
    """``scaling_pass_value`` 0 over every layer: the base row's forward is X-LoRA's scaling pass. The X-LoRA row
    is then bit-identical whether the base row runs or not, and each batch runs one decoder pass fewer (plus one
    on the first batch, which checks the base's last hidden state against ``scaling_pass``)."""
    model, tok, _, _, data = setup
    passes: list[int] = []
    hook = model.base_model.model.register_forward_pre_hook(lambda *a: passes.append(1))
    config = EvalConfig(batch_size=2, resamples=0)
    try:
        both = evaluate_files(model, tok, [data], config, rows=["base", "xlora"], progress=False)
        shared = len(passes)
        alone = evaluate_files(model, tok, [data], config, rows=["xlora"], progress=False)
    finally:
        hook.remove()
    batches = -(-len(RECORDS) // 2)
    assert (shared, len(passes) - shared) == (2 * batches + 1, 2 * batches)
    assert both.configs["xlora"] == alone.configs["xlora"] and both.routing == alone.routing


def test_the_shared_scaling_pass_stops_at_a_mismatch_and_needs_value_0_without_top_k(setup):
    from types import SimpleNamespace

    from xlora.analysis.eval_data import left_padded
    from xlora.analysis.evaluate import SharedScalingPass

    model, tok, _, _, data = setup
    fixed = {"base": "zero", "xlora": None}
    for change in ({"scaling_pass_value": 0.5}, {"top_k": 2}, {"scaling_pass_layers": 1}):
        other = SimpleNamespace(xlora_config=XLoraConfig(experts=model.xlora_config.experts, **change))
        assert not SharedScalingPass(other, fixed).on, change
    assert not SharedScalingPass(model, {"xlora": None}).on
    shared = SharedScalingPass(model, fixed)
    records = iter_eval_records([data], tok, chat=True, max_length=256, tokenize_record=tokenize_record)
    batch = left_padded([next(records).example, next(records).example], 0)
    with torch.no_grad():
        states = model.scaling_pass(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
    wrong = SimpleNamespace(hidden_states=(states + 1e-6,))
    assert shared.states(model, batch, wrong) is None and not shared.on and not shared.takes("base")


def test_arrow_row_equals_pefts_own_arrow_model(setup, result):
    model, tok, root, experts, _ = setup
    arrow = create_arrow_model(fresh_base(root)(), list(experts.values()), ArrowConfig(top_k=2, rng_seed=0)).eval()
    sums, counts = direct(model, tok, RECORDS, lambda r, i, lab: arrow(input_ids=i, labels=lab))
    for d in counts:
        assert result.configs["arrow"]["loss"][d] == pytest.approx(sums[d] / counts[d], abs=1e-5), d
    # Arrow routes: it is none of the single experts, nor uniform
    for other in (*NAMES, "uniform"):
        assert abs(result.configs["arrow"]["loss"]["mixed"] - result.configs[other]["loss"]["mixed"]) > 1e-4


def test_left_padded_batches_equal_one_record_at_a_time(setup, result):
    model, tok, root, _, data = setup
    one = evaluate_files(model, tok, [data], EvalConfig(batch_size=1, arrow_top_k=2), arrow_base=fresh_base(root),
                         progress=False)
    for row, c in result.configs.items():
        for d, v in c["loss"].items():
            assert v == pytest.approx(one.configs[row]["loss"][d], abs=1e-5), (row, d)
    assert result.routing["mean"]["beta"] == pytest.approx(one.routing["mean"]["beta"], abs=1e-5)


def test_a_fully_scored_record_left_padded_in_a_batch_scores_as_alone(setup):
    """A ``text`` record scores every token but its first, which follows nothing: padded behind a longer record,
    its first token must not be scored as predicted from the pad (the batch-8 run pads it, batch 1 does not)."""
    model, tok, _, _, data = setup
    runs = [evaluate_files(model, tok, [data], EvalConfig(batch_size=n, resamples=0), progress=False)
            for n in (8, 1)]
    one_batch, alone = ({r.where: r for r in run.per_record} for run in runs)
    text = next(w for w in alone if w.endswith("line 7"))
    assert one_batch[text].tokens == alone[text].tokens == len(tok(RECORDS[6]["text"])["input_ids"])
    for where, rec in alone.items():
        assert one_batch[where].tokens == rec.tokens
        assert one_batch[where].nll == pytest.approx(rec.nll, rel=1e-5), where


def test_routing_and_collapse_equal_the_heads_scalings(setup, result):
    model, tok, *_ = setup
    acc, n, hits, counts, first, gaps = {}, {}, {}, {}, {}, []
    weight, ent, total = torch.zeros(3, dtype=torch.float64), 0.0, 0
    for r in RECORDS:
        ids, labels = scored(tok, r)
        with torch.no_grad():
            s = model(input_ids=torch.tensor([ids])).scalings[0, :-1].double()  # [t-1, L, E]
        m = torch.tensor(labels[1:]) != -100
        per = s.mean(1)[m]  # [n, E]
        d = r["domain"]
        acc[d], n[d] = acc.get(d, 0) + per.sum(0), n.get(d, 0) + len(per)
        counts[d] = counts.get(d, 0) + 1
        hits[d] = hits.get(d, 0) + (NAMES[int(per.mean(0).argmax())] == d)
        first[d] = first.get(d, 0) + (NAMES[int(per[0].argmax())] == d)  # the first scored position alone
        gaps += [float(v[0] - v[1]) for v in (per.mean(0).topk(2).values, per[0].topk(2).values)]
        weight, ent, total = weight + per.sum(0), ent + float(token_entropy(s[m]).sum()), total + len(per)
    assert list(result.routing["mean"]) == ["alpha", "beta", "gamma", "delta"]  # routing even without an expert
    for d in acc:
        assert list(result.routing["mean"][d].values()) == pytest.approx((acc[d] / n[d]).tolist(), abs=1e-6)
    assert min(gaps) > 1e-4, gaps  # top-1 margins (6e-3 here) far above the paths' rounding: no CPU flips an argmax
    assert result.routing["top1_own"] == {d: hits[d] / counts[d] for d in NAMES}
    assert result.routing["top1_own_first"] == {d: first[d] / counts[d] for d in NAMES}
    assert result.routing["top1_own_first"] != result.routing["top1_own"], result.routing  # this seed: differs
    c = result.collapse
    assert c["max_expert_share"] == pytest.approx(float(weight.max() / weight.sum()), abs=1e-6)
    assert c["mean_entropy"] == pytest.approx(ent / total, abs=1e-6)
    assert c["mean_entropy_normalized"] == pytest.approx(ent / total / torch.log(torch.tensor(3.0)).item(), abs=1e-6)


def test_json_schema_and_files(result, tmp_path):
    paths = result.write(tmp_path)
    assert [p.name for p in paths] == ["eval.md", "eval.json", "eval_records.jsonl", "eval.png"]
    js = json.loads((tmp_path / "eval.json").read_text())
    assert list(js) == ["format", "model", "records", "domains", "configs", "routing", "collapse", "skipped",
                        "intervals"]
    assert js["format"] == "xlora-eval/1" and js["model"] == "tiny" and js["records"] == 7
    assert js["domains"] == ["alpha", "beta", "gamma", "delta"] and js["skipped"] == {}
    for row in js["configs"].values():
        assert list(row) == ["loss", "tokens", "task_score"] and row["task_score"] is None
        assert all(isinstance(v, float) for v in row["loss"].values()) and "mixed" in row["loss"]
        assert all(isinstance(v, int) for v in row["tokens"].values())
    assert list(js["routing"]) == ["mean", "top1_own", "top1_own_first"]
    assert list(js["collapse"]) == ["max_expert_share", "mean_entropy", "mean_entropy_normalized"]
    md = (tmp_path / "eval.md").read_text()
    assert md.count("\n| ") == (1 + 8) + (1 + 7) + (1 + 4) and "| oracle |" in md and "| arrow |" in md
    assert "top-1 own" in md and "95% Wilson interval" in md and "paired bootstrap" in md
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_records_file_sums_to_the_losses_and_intervals_hold_the_ratios(result, tmp_path):
    """eval_records.jsonl: one line per record whose NLLs sum, per row and domain, to the table's losses (the oracle:
    each record's own expert); the intervals: X-LoRA's mixed loss over each row's, inside its bootstrap interval."""
    result.write(tmp_path, png=False)
    lines = [json.loads(line) for line in (tmp_path / "eval_records.jsonl").read_text().splitlines()]
    assert sorted(int(r["where"].rsplit("line ", 1)[1]) for r in lines) == list(range(1, 8))  # each record once
    assert sorted(r["domain"] for r in lines) == sorted(r["domain"] for r in RECORDS)
    for row, cfg in result.configs.items():
        for d, loss in cfg["loss"].items():
            mine = [r for r in lines if row in r["nll"] and (d == "mixed" or r["domain"] == d)]
            assert sum(r["nll"][row] for r in mine) / sum(r["tokens"] for r in mine) == pytest.approx(loss, rel=1e-12)
    assert all(r["nll"]["oracle"] == r["nll"][r["domain"]] for r in lines if r["domain"] in NAMES)
    assert {r["top1"] for r in lines} <= set(NAMES) and all(r["top1"] for r in lines)
    spans = result.intervals
    assert spans["reference"] == "xlora" and spans["resamples"] == 2000 and spans["level"] == 0.95
    assert list(spans["loss_ratio"]) == ["base", *NAMES, "uniform", "oracle", "arrow"]
    x = result.configs["xlora"]["loss"]
    for row, cells in spans["loss_ratio"].items():
        both = [r for r in lines if row in r["nll"]]  # the oracle leaves out delta, which names no expert
        expected = sum(r["nll"]["xlora"] for r in both) / sum(r["nll"][row] for r in both)
        assert cells["mixed"][0] == pytest.approx(expected, rel=1e-12)
        if row != "oracle":
            assert expected == pytest.approx(x["mixed"] / result.configs[row]["loss"]["mixed"], rel=1e-12)
        for ratio, low, high in cells.values():
            assert low <= ratio <= high
    assert spans["top1_own"].keys() == result.routing["top1_own"].keys()


def test_prompt_completion_without_chat_is_joined_as_the_trainer_joins(setup):
    model, tok, _, _, data = setup
    plain = evaluate_files(model, tok, [data], EvalConfig(chat=False), rows=["base"], progress=False)
    pc = [r for r in RECORDS if "prompt" in r]
    sums, counts = direct(model, tok, pc, lambda r, i, lab: model(input_ids=i, labels=lab, scalings="zero"),
                          chat=False)
    assert plain.configs["base"]["loss"]["gamma"] == pytest.approx(sums["gamma"] / counts["gamma"], abs=1e-5)
    assert list(plain.configs) == ["base"] and plain.routing is None and plain.collapse is None


def test_answers_are_greedy_and_scored_by_the_checks(setup):
    model, tok, root, _, data = setup
    res = evaluate_files(model, tok, [data], EvalConfig(generate=1, max_new_tokens=4, arrow_top_k=2),
                         arrow_base=fresh_base(root), progress=False)
    samples = [RECORDS[0], RECORDS[1], RECORDS[2]]  # the first record with a reference answer per domain
    for row in ("base", "alpha", "xlora"):
        answers = res.answers[row]
        for r, a in zip(samples, answers):  # batched answers equal one prompt at a time
            ids = scored(tok, r)[1]
            first = next(i for i, t in enumerate(ids) if t != -100)
            prompt = scored(tok, r)[0][:first]
            assert a == greedy_answers(model, tok, [prompt], 4, 1, {"base": "zero", "xlora": None}.get(row, row))[0]
        assert res.configs[row]["task_score"]["mixed"] == sum(check_answer(r, a) for r, a in zip(samples, answers)) / 3
    assert res.answers["oracle"] == [res.answers["alpha"][0], res.answers["beta"][1], res.answers["gamma"][2]]
    single = evaluate_files(model, tok, [data], EvalConfig(generate=1, max_new_tokens=4, answer_batch_size=1),
                            rows=["base", "alpha", "xlora"], progress=False)  # default: 16 prompts per batch
    assert all(single.answers[row] == res.answers[row] for row in ("base", "alpha", "xlora"))
    # a custom checker sees the raw record and the answer
    seen = []
    evaluate_files(model, tok, [data], EvalConfig(generate=1, max_new_tokens=2), rows=["base"], progress=False,
                   checker=lambda rec, ans: seen.append(rec["domain"]) or 0.5)
    assert seen == ["alpha", "beta", "gamma"]


def test_answers_are_batched_by_answer_batch_size(setup, monkeypatch):
    import xlora.analysis.eval_answers as eval_answers

    model, tok, _, _, data = setup
    seen, greedy = [], eval_answers.greedy_answers
    monkeypatch.setattr(eval_answers, "greedy_answers", lambda *a, **k: seen.append(a[4]) or greedy(*a, **k))
    for config, size in ((EvalConfig(generate=1, max_new_tokens=2), 16), (EvalConfig(generate=1, max_new_tokens=2,
                         batch_size=3), 6), (EvalConfig(generate=1, max_new_tokens=2, answer_batch_size=1), 1)):
        seen.clear()
        evaluate_files(model, tok, [data], config, rows=["base", "xlora"], progress=False)
        assert seen and set(seen) == {size}, (config, seen)


def test_experts_answering_only_their_own_domain_equal_the_all_answers_there(setup):
    model, tok, _, _, data = setup
    cfg = dict(generate=1, max_new_tokens=4)
    every = evaluate_files(model, tok, [data], EvalConfig(**cfg), rows=["base", "alpha", "beta", "gamma", "oracle",
                                                                       "xlora"], progress=False)
    own = evaluate_files(model, tok, [data], EvalConfig(**cfg, expert_answers="own"),
                         rows=["base", "alpha", "beta", "gamma", "oracle", "xlora"], progress=False)
    for i, expert in enumerate(("alpha", "beta", "gamma")):  # sample i is the first record of domain i
        assert own.answers[expert] == [every.answers[expert][i] if j == i else None for j in range(3)]
        assert own.configs[expert]["task_score"] == {expert: every.configs[expert]["task_score"][expert]}
    for row in ("base", "oracle", "xlora"):
        assert own.answers[row] == every.answers[row]
        assert own.configs[row]["task_score"] == every.configs[row]["task_score"]
    with pytest.raises(ValueError, match=r"EvalConfig.expert_answers must be one of \('all', 'own'\), got 'mine'"):
        EvalConfig(expert_answers="mine")


@pytest.mark.parametrize("check, answer, score", [
    ({"exact": True}, " 5 ", 1.0), ({"exact": True}, "5.0", 0.0), ({"rel_tol": 0.01}, "about 5.04", 1.0),
    ({"rel_tol": 0.001}, "5.04", 0.0), ({"abs_tol": 0.1}, "4.95 units", 1.0), ({"abs_tol": 0.01}, "no number", 0.0),
])
def test_check_answer(check, answer, score):
    assert check_answer({"prompt": "?", "completion": "5", "check": check}, answer) == score


def test_arrow_is_skipped_with_a_reason_for_experts_of_other_ranks(setup, tmp_path):
    model, tok, root, experts, data = setup
    odd = make_expert(tiny_model("llama"), tmp_path / "odd", r=2, alpha=4, targets=TARGETS, seed=9)
    mixed = XLoraModel(fresh_base(root)(), XLoraConfig(experts={"alpha": experts["alpha"], "odd": str(odd)}))
    res = evaluate_files(mixed, tok, [data], EvalConfig(max_records=2), arrow_base=fresh_base(root), progress=False)
    assert "arrow" not in res.configs and res.records == 2
    assert res.skipped == {"arrow": "Arrow needs experts of one rank; these have {'alpha': 4, 'odd': 2} "
                                    "(or a rank_pattern)"}


def write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "a", "completion": "b", "domain": "alpha"})


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl: line 3 is not valid JSON"),
    ("[1, 2]", r"bad.jsonl: line 3 is a JSON list, not an object"),
    (json.dumps({"text": ""}), r"bad.jsonl: line 3: the record has no token to score"),  # EOS alone: nothing after it
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"line 3: its last message is not the assistant"),
    (json.dumps({"text": "x" * 300}), r"line 3: the record is longer than the model's context of 256 tokens"),
    (json.dumps({"question": "?"}), r"line 3: has keys \['question'\], which match none"),
    (json.dumps({"prompt": "a", "completion": "b", "check": {"fuzzy": 1}}), r"line 3: 'check' must be one of"),
])
def test_bad_records_name_file_and_line_or_are_skipped(setup, tmp_path, line, message):
    model, tok, *_ = setup
    path = write(tmp_path, [GOOD, "", line, GOOD])
    with pytest.raises(BadRecord, match=message):
        list(iter_eval_records([path], tok, chat=True, max_length=256, tokenize_record=tokenize_record))
    bad = []
    kept = list(iter_eval_records([path], tok, chat=True, max_length=256, tokenize_record=tokenize_record, skip_bad=True, skipped=bad))
    assert len(kept) == 2 and [k.where for k in kept] == [f"{path}: line 1", f"{path}: line 4"]
    assert len(bad) == 1 and bad[0].startswith(f"{path}: line 3")


def test_missing_and_empty_files(setup, tmp_path):
    model, tok, *_ = setup
    with pytest.raises(FileNotFoundError, match="nope.jsonl' does not exist"):
        list(iter_eval_records([tmp_path / "nope.jsonl"], tok, chat=True, max_length=256, tokenize_record=tokenize_record))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        list(iter_eval_records([tmp_path / "empty.jsonl"], tok, chat=True, max_length=256, tokenize_record=tokenize_record))


def test_unknown_rows_and_nothing_left_to_score_are_errors(setup, tmp_path):
    model, tok, _, _, data = setup
    with pytest.raises(ValueError, match=r"rows \['xlroa'\] are not rows of this model; choose among \['base', "):
        evaluate_files(model, tok, [data], rows=["base", "xlroa"], progress=False)
    with pytest.raises(ValueError, match="no record was left to score"):
        evaluate_files(model, tok, [write(tmp_path, ["{bad"])], EvalConfig(skip_bad=True), progress=False)


def test_eval_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"EvalConfig.batch_size must be an integer >= 1, got 0"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"EvalConfig.max_records must be a positive integer or None"):
        EvalConfig(max_records=0)
    with pytest.raises(ValueError, match=r"EvalConfig.answer_batch_size must be a positive integer or None "
                                         r"\(2 x batch_size\), got 0"):
        EvalConfig(answer_batch_size=0)


def test_cli_eval_writes_its_files(setup, tmp_path, capsys):
    from xlora.cli import main

    model, tok, root, _, data = setup
    out = tmp_path / "out"
    assert main(["eval", str(root / "xlora"), "--data", str(data), "--base", str(root / "base"), "--out", str(out),
                 "--arrow-top-k", "2", "--batch-size", "4", "--resamples", "300"]) == 0
    js = json.loads((out / "eval.json").read_text())
    assert js["intervals"]["resamples"] == 300 and len((out / "eval_records.jsonl").read_text().splitlines()) == 7
    assert js["model"] == str(root / "xlora") and list(js["configs"]) == ["base", *NAMES, "uniform", "oracle",
                                                                         "arrow", "xlora"]
    printed = capsys.readouterr().out
    assert "| xlora |" in printed and (out / "eval.png").is_file()
    # the same numbers as the library call (the head was saved and reloaded)
    res = evaluate_files(model, tok, [data], EvalConfig(arrow_top_k=2), arrow_base=fresh_base(root), progress=False)
    assert js["configs"]["xlora"]["loss"] == pytest.approx(res.configs["xlora"]["loss"], abs=1e-6)
    assert main(["eval", str(root / "xlora"), "--data", str(tmp_path / "missing.jsonl"), "--base",
                 str(root / "base"), "--out", str(out)]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err
    # a wrong data path fails before any model loads (here the model folder does not even exist)
    (tmp_path / "empty.jsonl").write_text("")
    for name, message in (("missing.jsonl", "does not exist"), ("empty.jsonl", "is empty")):
        assert main(["eval", str(tmp_path / "no-model"), "--data", str(tmp_path / name)]) == 2
        assert f"{name}' {message}" in capsys.readouterr().err


def test_cli_compare_two_runs_of_the_same_records(setup, result, tmp_path, capsys):
    """``xlora compare A B``: X-LoRA's loss in A over B's (Σ NLL over the records files) and the top-1 own share
    of A minus B's per domain, each with its interval; refused for a folder without records or other records."""
    from xlora.cli import main

    model, tok, root, _, data = setup
    other = XLoraModel.from_pretrained(root / "xlora", base_model=str(root / "base")).eval()
    randomize_head(other, seed=3, std=1.0)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    result.write(a)
    evaluate_files(other, tok, [data], EvalConfig(resamples=0), progress=False).write(b)
    evaluate_files(other, tok, [data], EvalConfig(resamples=0, max_records=3), progress=False).write(c)
    assert main(["compare", str(a), str(b)]) == 0
    table = {line.split(" | ")[1]: line.split(" | ")[2:] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| - |")}
    ra, rb = ([json.loads(x) for x in (d / "eval_records.jsonl").read_text().splitlines()] for d in (a, b))
    ratio = sum(r["nll"]["xlora"] for r in ra) / sum(r["nll"]["xlora"] for r in rb)
    point, span = table["mixed"][0].split(" [")
    low, high = (float(x) for x in span.rstrip("]").split(", "))
    assert float(point) == pytest.approx(ratio, abs=5e-4) and low <= float(point) <= high
    for d in NAMES:
        share = [sum(r["top1"] == d for r in run if r["domain"] == d) / sum(r["domain"] == d for r in run)
                 for run in (ra, rb)]
        assert float(table[d][1].split(" [")[0]) == pytest.approx(share[0] - share[1], abs=5e-3)
    assert main(["compare", str(a), str(tmp_path)]) == 2
    assert "has no eval_records.jsonl" in capsys.readouterr().err
    assert main(["compare", str(a), str(c)]) == 2
    assert "did not score the same records" in capsys.readouterr().err


def test_peft_single_expert_equals_the_expert_row(setup, result):
    """An independent check of one expert row: PEFT's own model with only that adapter."""
    model, tok, root, experts, _ = setup
    peft = PeftModel.from_pretrained(fresh_base(root)(), experts["gamma"]).eval()
    sums, counts = direct(model, tok, RECORDS, lambda r, i, lab: peft(input_ids=i, labels=lab))
    assert result.configs["gamma"]["loss"]["gamma"] == pytest.approx(sums["gamma"] / counts["gamma"], abs=1e-5)


def test_cli_skip_bad_counts_and_data_needs_a_model_dir(setup, tmp_path, capsys):
    from xlora.cli import main

    _, _, root, _, data = setup
    path = write(tmp_path, [GOOD, "{oops", GOOD])
    args = ["eval", str(root / "xlora"), "--data", str(path), "--base", str(root / "base"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(f"{path}: line 2 is not valid JSON (Expecting property name "
                                                    f"enclosed in double quotes: line 1 column 2 (char 1)); each line "
                                                    f"must be one JSON object")
    assert main([*args, "--skip-bad", "--arrow-top-k", "9"]) == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["records"] == 2
    assert f"1 bad records skipped (first: {path}: line 2 is not valid JSON" in (tmp_path / "o" / "eval.md").read_text()
    assert main(["eval", "--data", str(data)]) == 2
    assert "xlora eval MODEL_DIR needs --data FILE" in capsys.readouterr().err


def test_other_formats_go_through_the_trainers_reader(setup, tmp_path):
    pytest.importorskip("datasets")
    from xlora.train.records import iter_records

    model, tok, *_ = setup
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "bc", "domain": "alpha"},
                                {"prompt": "d", "completion": "ef", "domain": "beta"}]))
    with pytest.raises(ValueError, match=r"records.json' is not JSON lines; convert it to .jsonl or pass read_records"):
        evaluate_files(model, tok, [path], rows=["base"], progress=False)
    res = evaluate_files(model, tok, [path], rows=["base"], progress=False, read_records=iter_records)
    assert res.records == 2 and res.domains == ["alpha", "beta"]


def test_routing_of_a_chunk_must_follow_its_losses():
    """The per-record routing is written into the entries add_losses made for the same records, in order."""
    from types import SimpleNamespace

    from xlora.analysis.eval_report import Totals

    totals = Totals(NAMES, ["xlora"])
    chunk = [SimpleNamespace(where=f"f: line {i}", domain="alpha", raw={}) for i in range(2)]
    s = torch.full((2, 3, 4, 3), 1 / 3)
    s[..., 1] = 0.5
    mask, entropy = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="must follow add_losses"):
        totals.add_routing(chunk, s, mask, entropy)
    totals.add_losses(chunk, {"xlora": [1.0, 2.0]}, [3, 3])
    with pytest.raises(RuntimeError, match="must follow add_losses"):
        totals.add_routing(chunk[::-1], s, mask, entropy)
    totals.add_routing(chunk, s, mask, entropy)
    assert [e.top1 for e in totals.per_record] == ["beta", "beta"] and totals.hits == {"alpha": 0}
