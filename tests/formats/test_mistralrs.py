"""mistral.rs's X-LoRA layout: export (files, names, command line), import (ours and the Hub's
sub-folder layout with a reordered ordering file), refusals, and mistral.rs itself running our export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LLAMA_TARGETS, make_expert, tiny_tokenizer, tokens
from formats_fixtures import build, copy_head
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from xlora import XLoraConfig, XLoraModel, formats
from xlora.cli import main
from xlora.formats.mistralrs import export

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*rope_theta")]


def test_export_writes_mistralrs_layout_and_reads_back_to_the_same_logits(llama, tmp_path, capsys):
    ours = build(llama, head_depth=2, head_hidden_size=32, layerwise_scalings=True, head_dropout=0.3,
                 scaling_pass_value=0.2, softmax_temperature=0.8)
    x = tokens(batch=2, seq=8, seed=3)
    ref = ours(x).logits
    ours.save_pretrained(tmp_path / "ours")
    out = tmp_path / "mrs"
    assert main(["export-mistralrs", str(tmp_path / "ours"), str(out), "--tgt-non-granular-index", "3"]) == 0
    base = str(llama.base_dir)
    assert capsys.readouterr().out.strip() == (f"mistralrs serve -m {base} --xlora {out} --xlora-order "
                                               f"{out / 'ordering.json'} --tgt-non-granular-index 3")
    names = ["alpha", "beta", "gamma"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.adapter_{k}" for n in names for k in ("config.json", "model.safetensors")]
        + ["ordering.json", "xlora_classifier.safetensors", "xlora_config.json"])
    ordering = json.loads((out / "ordering.json").read_text())
    assert ordering == {"order": names, "layers": {m: l for l, m in enumerate(ours.adapted_modules)}, "base_model_id": base}
    cfg = json.loads((out / "xlora_config.json").read_text())
    assert cfg["adapters"] == names and cfg["base_model_id"] == base and cfg["xlora_dropout_p"] == 0.0
    assert cfg["xlora_depth"] == 2 and cfg["enable_relu_and_dropout"] and cfg["scaling_pass_value"] == 0.2
    assert set(load_file(str(out / "xlora_classifier.safetensors"))) == {"inner.0.weight", "inner.0.bias", "last.weight",
                                                                          "last.bias"}
    configs = [json.loads((out / f"{n}.adapter_config.json").read_text()) for n in names]
    assert all(c["target_modules"] == sorted(LLAMA_TARGETS) and c["lora_alpha"] == c["r"] for c in configs)
    assert [c["r"] for c in configs] == [4, 2, 8]
    beta = load_file(str(out / "beta.adapter_model.safetensors"))  # beta adapted q/k only: zeros elsewhere
    assert len(beta) == 2 * ours.num_layers and not beta["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].any()
    assert formats.detect(out) == "mistralrs"
    with pytest.warns(UserWarning, match="temporary folder"):
        back = XLoraModel.from_pretrained(out, base_model=llama.base()).eval()
    torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=1e-5)
    assert (ref - ours(x, scalings="uniform").logits).abs().max() > 1e-4


def test_hub_layout_and_a_reordered_ordering_file_import_exactly(llama, tmp_path):
    """The Hub layout (the original package's sub-folders, classifier keys in the expert files) with
    the ordering file elsewhere and its layer indices permuted: a layerwise head is reordered to ours."""
    ours = build(llama, head_depth=1, layerwise_scalings=True)
    names = {"adapter_1": "alpha", "adapter_2": "beta", "adapter_3": "gamma"}
    direct = XLoraModel(llama.base(), XLoraConfig(
        experts={n: str(llama.expert_dirs[o]) for n, o in names.items()}, layerwise_scalings=True)).eval()
    w, b = ours.head.layers[0].weight.detach(), ours.head.layers[0].bias.detach()
    copy_head(direct, [(w, b)])
    L, E = direct.num_layers, direct.num_experts
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(0))  # our l -> the file's index
    w_file, b_file = torch.empty_like(w).view(L, E, -1), torch.empty_like(b).view(L, E)
    w_file[perm], b_file[perm] = w.view(L, E, -1), b.view(L, E)
    src = tmp_path / "hub"
    for new, old in names.items():
        (src / new).mkdir(parents=True)
        shutil.copy(llama.expert_dirs[old] / "adapter_config.json", src / new)
        state = load_file(str(llama.expert_dirs[old] / "adapter_model.safetensors"))
        save_file(state | {"internal_xlora_classifier.last.bias": torch.zeros(3)}, str(src / new / "adapter_model.safetensors"))
    save_file({"last.weight": w_file.reshape(L * E, -1), "last.bias": b_file.reshape(-1)}, str(src / "xlora_classifier.safetensors"))
    cfg = {"hidden_size": 32, "base_model_id": str(llama.base_dir), "adapters": list(names), "layerwise_scalings": True}
    (src / "xlora_config.json").write_text(json.dumps(cfg))
    layers = {m: int(perm[l]) for l, m in enumerate(direct.adapted_modules)}
    order_file = tmp_path / "paper-ordering.json"
    order_file.write_text(json.dumps({"order": list(names), "layers": layers, "base_model_id": str(llama.base_dir)}))
    assert formats.detect(src) == "original"  # without its ordering file it is the original package's layout
    with pytest.warns(UserWarning, match="temporary folder"):
        loaded = XLoraModel.from_pretrained(src, llama.base(), ordering=order_file).eval()
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, direct(x).logits, rtol=0, atol=1e-5)
    assert not torch.equal(perm, torch.arange(L))
    # an ordering made for another base model or other target modules is refused, naming the modules
    del layers["model.layers.1.mlp.down_proj"]
    layers["model.layers.7.mlp.down_proj"] = L - 1
    order_file.write_text(json.dumps({"order": list(names), "layers": layers, "base_model_id": str(llama.base_dir)}))
    with pytest.raises(ValueError, match=r"paper-ordering.json.*its layers do not match the base model .*"
                                         r"1 name modules not adapted here \['model.layers.7.mlp.down_proj'\]"):
        XLoraModel.from_pretrained(src, llama.base(), ordering=order_file)


def test_export_refuses_what_mistralrs_cannot_run(llama, setups, tmp_path):
    experts = {"beta": llama.expert_dirs["beta"], "beta2": llama.expert_dirs["gamma"]}
    clash = XLoraModel(llama.base(), XLoraConfig(experts={k: str(v) for k, v in experts.items()})).eval()
    with pytest.raises(ValueError, match=r"adapter names collide.*file 'beta2.adapter_config.json' contains the names "
                                         r"\['beta', 'beta2'\].*rename the experts"):
        export(clash, tmp_path / "a")
    short = XLoraModel(llama.base(), XLoraConfig(experts={"a": str(llama.expert_dirs["alpha"])})).eval()
    with pytest.raises(ValueError, match=r"file 'xlora_config.json' contains the names \['a'\]"):
        export(short, tmp_path / "b")
    with pytest.raises(ValueError, match="mistral.rs refuses top_k_lora"):
        export(build(llama, top_k=2), tmp_path / "c")
    with pytest.raises(ValueError, match=r"head_depth=2 loads there only when head_hidden_size equals it \(it is 16\)"):
        export(build(llama, head_depth=2, head_hidden_size=16), tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty: mistral.rs reads every file at its top level"):
        export(build(llama), tmp_path / "e")
    with pytest.raises(ValueError, match="mistral.rs has no X-LoRA model for model_type 'gpt2'"):
        export(build(setups["gpt2"]), tmp_path / "f")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# ------------------------------------------------------------------ mistral.rs itself
@pytest.fixture(scope="module")
def mistralrs_setup(tmp_path_factory):
    """A tiny Llama whose vocabulary is exactly the tokenizer's, saved as mistral.rs 0.9.5 reads it:
    rope_theta at the top of config.json, and a ByteLevel decoder (its grammar layer needs one)."""
    root = tmp_path_factory.mktemp("mistralrs")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    base_dir = root / "base"
    base.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    cfg = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps(cfg | {"rope_theta": cfg["rope_parameters"]["rope_theta"]}))
    t = json.loads((base_dir / "tokenizer.json").read_text())
    t["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    t["model"]["vocab"]["\u0120"] = t["model"]["vocab"].pop(" ")  # ByteLevel spells a space Ġ
    (base_dir / "tokenizer.json").write_text(json.dumps(t))
    experts = {"alpha": make_expert(base, root / "alpha", r=4, alpha=8, targets=LLAMA_TARGETS, seed=1, rslora=True),
               "gamma": make_expert(base, root / "gamma", r=8, alpha=4, targets=LLAMA_TARGETS[-2:], seed=3)}
    return base_dir, experts


def test_mistralrs_runs_our_export_with_our_greedy_tokens(mistralrs_setup, tmp_path):
    mistralrs = pytest.importorskip("mistralrs", reason="mistralrs (the CPU wheel, pip install mistralrs==0.9.5) "
                                                        "is not installed")
    from transformers import PreTrainedTokenizerFast

    base_dir, experts = mistralrs_setup
    model = XLoraModel(AutoModelForCausalLM.from_pretrained(str(base_dir)).eval(), XLoraConfig(
        experts={k: str(v) for k, v in experts.items()}, head_depth=2, head_hidden_size=32, layerwise_scalings=True,
        head_dropout=0.3)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 1.0)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(base_dir / "tokenizer.json"))
    ids = torch.tensor([tok("a").input_ids])
    assert ids.shape == (1, 1)  # one token: mistral.rs 0.9.5's X-LoRA fails on longer prompts on CPU

    def greedy(scalings=None):
        with model.fixed_scalings(scalings):
            return model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)[0, 1:].tolist()

    ours = greedy()
    assert min(ours) >= 4 and ours != greedy("alpha") and ours != greedy("gamma")  # printable, and a real mixture
    export(model, tmp_path / "mrs")
    runner = mistralrs.Runner(which=mistralrs.Which.XLora(
        xlora_model_id=str(tmp_path / "mrs"), order=str(tmp_path / "mrs" / "ordering.json"), model_id=str(base_dir),
        dtype=mistralrs.ModelDType.F32), token_source="none")
    res = runner.send_completion_request(mistralrs.CompletionRequest(prompt="a", model="x", max_tokens=10, temperature=0.0))
    assert res.usage.completion_tokens == 10
    assert res.choices[0].text == tok.decode(ours)  # one character per token: the same tokens
