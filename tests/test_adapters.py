"""Reading PEFT-format LoRA adapters: what loads (and with which scale), and every refusal naming its culprit."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from xlora import XLoraConfig
from xlora.adapters import CONFIG_NAME, WEIGHTS_NAME, load_expert, load_experts, save_expert

ATTN = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj")]


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def peft_adapter(base, path: Path, seed: int = 0, **lora) -> Path:
    """Save a PEFT LoRA adapter (random A and B) for ``base`` and return its directory."""
    lora.setdefault("r", 2)
    lora.setdefault("lora_alpha", 4)
    lora.setdefault("target_modules", ["q_proj"])
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(str(path))
    return path


def peft_params(base, path: Path) -> dict[str, torch.Tensor]:
    """The adapter's lora_A / lora_B as PEFT itself loads them, keyed '<module>.A' / '<module>.B'."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    out = {}
    for name, p in model.named_parameters():
        m = re.fullmatch(r"base_model\.model\.(.*)\.lora_([AB])\.default\.weight", name)
        if m:
            out[f"{m[1]}.{m[2]}"] = p.detach()
    return out


# --- what loads -------------------------------------------------------------------------------


def test_fixture_experts_heterogeneous_ranks_alphas_and_rslora(llama):
    base = llama.base()
    experts = load_experts({k: str(v) for k, v in llama.expert_dirs.items()}, base)
    assert [e.name for e in experts] == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = experts
    # alpha: r=4, lora_alpha=8 -> 8/4; beta: r=2, lora_alpha=3, rsLoRA -> 3/sqrt(2); gamma: r=8, lora_alpha=4 -> 4/8
    assert {m.scale for m in alpha.modules.values()} == {2.0}
    assert {m.scale for m in beta.modules.values()} == {3 / math.sqrt(2)}
    assert {m.scale for m in gamma.modules.values()} == {0.5}
    assert {m.rank for m in alpha.modules.values()} == {4}
    assert {m.rank for m in beta.modules.values()} == {2}
    assert {m.rank for m in gamma.modules.values()} == {8}
    assert {m.dropout for e in experts for m in e.modules.values()} == {0.0}
    # the loaded tensors are PEFT's, bit for bit
    ref = peft_params(base, llama.expert_dirs["gamma"])
    assert len(ref) == 2 * len(gamma.modules)
    for module, w in gamma.modules.items():
        assert torch.equal(w.A, ref[f"{module}.A"]) and torch.equal(w.B, ref[f"{module}.B"])


def test_expert_adapts_only_its_target_modules(llama):
    base = llama.base()
    beta = load_expert("beta", llama.expert_dirs["beta"], base)  # targets q_proj, k_proj
    assert sorted(beta.modules) == sorted(ATTN)
    gamma = load_expert("gamma", llama.expert_dirs["gamma"], base)  # targets up_proj, down_proj
    assert sorted(gamma.modules) == sorted(f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("down_proj", "up_proj"))
    alpha = load_expert("alpha", llama.expert_dirs["alpha"], base)
    assert len(alpha.modules) == 2 * 7
    q = alpha.modules["model.layers.0.self_attn.q_proj"]
    k = alpha.modules["model.layers.0.self_attn.k_proj"]  # 2 KV heads of 8 dims: out 16
    down = alpha.modules["model.layers.1.mlp.down_proj"]
    assert (tuple(q.A.shape), tuple(q.B.shape)) == ((4, 32), (32, 4))
    assert (tuple(k.A.shape), tuple(k.B.shape)) == ((4, 32), (16, 4))
    assert (tuple(down.A.shape), tuple(down.B.shape)) == ((4, 64), (32, 4))


def test_rank_and_alpha_patterns_are_honoured(tmp_path, base):
    path = peft_adapter(
        base, tmp_path / "pat", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.self_attn.k_proj": 6},
        alpha_pattern={"v_proj": 12, r"layers\.0\.self_attn\.q_proj": 1},
    )
    expert = load_expert("pat", path, base)
    got = {m: (w.rank, w.scale) for m, w in expert.modules.items()}
    assert got == {
        "model.layers.0.self_attn.q_proj": (2, 1 / 2),   # rank 2 (pattern), alpha 1 (regex pattern)
        "model.layers.1.self_attn.q_proj": (2, 8 / 2),   # rank 2 (pattern), default alpha
        "model.layers.0.self_attn.k_proj": (4, 8 / 4),   # defaults
        "model.layers.1.self_attn.k_proj": (6, 8 / 6),   # rank 6 (full-name pattern)
        "model.layers.0.self_attn.v_proj": (4, 12 / 4),  # alpha 12 (pattern)
        "model.layers.1.self_attn.v_proj": (4, 12 / 4),
    }
    ref = peft_params(base, path)
    for module, w in expert.modules.items():
        assert torch.equal(w.A, ref[f"{module}.A"]) and torch.equal(w.B, ref[f"{module}.B"])


def test_rslora_with_patterns_uses_sqrt_rank(tmp_path, base):
    path = peft_adapter(base, tmp_path / "rs", r=9, lora_alpha=6, use_rslora=True, rank_pattern={"k_proj": 4},
                        target_modules=["q_proj", "k_proj"], lora_dropout=0.25)
    expert = load_expert("rs", path, base)
    assert expert.modules["model.layers.0.self_attn.q_proj"].scale == 6 / 3  # 6 / sqrt(9)
    assert expert.modules["model.layers.0.self_attn.k_proj"].scale == 6 / 2  # 6 / sqrt(4)
    assert {w.dropout for w in expert.modules.values()} == {0.25}


def test_gpt2_conv1d_modules(setups):
    setup = setups["gpt2"]
    base = setup.base()
    alpha = load_expert("alpha", setup.expert_dirs["alpha"], base)
    assert sorted(alpha.modules) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    shapes = {m: (tuple(w.A.shape), tuple(w.B.shape)) for m, w in alpha.modules.items() if m.startswith("transformer.h.0")}
    # Conv1D stores its weight [in, out]; LoRA is still A [r, in], B [out, r]
    assert shapes == {
        "transformer.h.0.attn.c_attn": ((4, 32), (96, 4)),
        "transformer.h.0.attn.c_proj": ((4, 32), (32, 4)),
        "transformer.h.0.mlp.c_fc": ((4, 32), (128, 4)),
        "transformer.h.0.mlp.c_proj": ((4, 128), (32, 4)),
    }
    ref = peft_params(base, setup.expert_dirs["alpha"])
    for module, w in alpha.modules.items():
        assert torch.equal(w.A, ref[f"{module}.A"]) and torch.equal(w.B, ref[f"{module}.B"])


def test_relative_paths_resolve_against_root(llama, base):
    root = llama.expert_dirs["beta"].parent
    (e,) = load_experts({"beta": llama.expert_dirs["beta"].name}, base, root=root)
    assert e.path == root / llama.expert_dirs["beta"].name
    assert len(e.modules) == 4


# --- save_expert ------------------------------------------------------------------------------


def test_save_expert_without_weights_copies_bytes(tmp_path, llama, base):
    src = llama.expert_dirs["beta"]
    expert = load_expert("beta", src, base)
    out = tmp_path / "copy"
    save_expert(expert, out)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporaries left
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        assert (out / fname).read_bytes() == (src / fname).read_bytes()
    save_expert(expert, out)  # overwriting is fine
    assert (out / WEIGHTS_NAME).read_bytes() == (src / WEIGHTS_NAME).read_bytes()
    # saving onto itself leaves the files alone
    save_expert(load_expert("beta", out, base), out)
    assert (out / WEIGHTS_NAME).read_bytes() == (src / WEIGHTS_NAME).read_bytes()


def test_save_expert_with_weights_round_trips(tmp_path, llama, base):
    expert = load_expert("beta", llama.expert_dirs["beta"], base)
    new = {m: (w.A * 2, w.B + 1) for m, w in expert.modules.items()}
    out = tmp_path / "trained"
    save_expert(expert, out, weights=new)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    back = load_expert("beta", out, base)
    assert back.config == expert.config
    for m, (A, B) in new.items():
        assert torch.equal(back.modules[m].A, A) and torch.equal(back.modules[m].B, B)
        assert back.modules[m].scale == expert.modules[m].scale


# --- refusals ---------------------------------------------------------------------------------


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path, base):
    path = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == f"expert 'chem': adapter directory {str(path)!r} does not exist"


def test_path_is_a_file(tmp_path, base):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match=re.escape(f"expert 'chem': {str(path)!r} is not a directory")):
        load_expert("chem", path, base)


def test_missing_adapter_config(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    (path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_expert("chem", path, base)
    assert str(info.value).startswith(f"expert 'chem': {str(path / CONFIG_NAME)!r} is missing")


def test_invalid_adapter_config(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    (path / CONFIG_NAME).write_text("{oops")
    with pytest.raises(ValueError, match=re.escape(f"expert 'chem': {str(path / CONFIG_NAME)!r} is not valid JSON")):
        load_expert("chem", path, base)
    cfg = json.loads((llama.expert_dirs["beta"] / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match=re.escape("expert 'chem': peft_type is 'IA3', but X-LoRA experts must be LoRA")):
        load_expert("chem", path, base)
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(ValueError, match=re.escape("expert 'chem': adapter_config.json needs a positive r, got 0")):
        load_expert("chem", path, base)


def test_missing_safetensors(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == f"expert 'chem': {str(path / WEIGHTS_NAME)!r} is missing"


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"this is not a safetensors file at all" * 10,
                                     b"\xff\xff\xff\xff\xff\xff\xff\x7f{}"])
def test_corrupt_safetensors(tmp_path, llama, base, garbage):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    (path / WEIGHTS_NAME).write_bytes(garbage)
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value).startswith(f"expert 'chem': {str(path / WEIGHTS_NAME)!r} is not a readable safetensors file")


def test_truncated_safetensors(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{str(path / WEIGHTS_NAME)!r} is not a readable safetensors file")):
        load_expert("chem", path, base)


class _TouchOnUnpickle:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_bin_only_adapter_is_refused_without_unpickling(tmp_path, llama, base, monkeypatch):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    (path / WEIGHTS_NAME).unlink()
    sentinel = tmp_path / "UNPICKLED"
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(str(sentinel))))

    def forbidden(*a, **k):
        raise AssertionError("the loader unpickled adapter_model.bin")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    msg = str(info.value)
    assert msg.startswith(f"expert 'chem': {str(path)!r} holds only adapter_model.bin, a pickle, which xlora never loads")
    assert "save_pretrained" in msg  # says how to convert
    assert not sentinel.exists()


def test_adapter_for_another_base_model_names_module_and_shapes(tmp_path, base):
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    path = peft_adapter(other, tmp_path / "other", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    msg = str(info.value)
    assert msg == (
        "expert 'chem' adapts 'model.layers.0.self_attn.q_proj' with lora_A (2, 48) and lora_B (48, 2), "
        "but the base model's module maps 32 -> 32 (needs lora_A (r, 32), lora_B (32, r)): "
        "was it trained on another base model?"
    )


def test_adapter_with_more_layers_than_base(tmp_path, base):
    torch.manual_seed(0)
    deeper = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    path = peft_adapter(deeper, tmp_path / "deeper", target_modules=["v_proj"])
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': module 'model.layers.2.self_attn.v_proj' does not exist in the base model "
        "(LlamaForCausalLM): was the adapter trained on another base model?"
    )


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS_NAME))
    save_file(edit(tensors), str(path / WEIGHTS_NAME))


def test_module_the_base_lacks(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    rewrite_weights(path, lambda t: {k.replace("layers.1.self_attn.k_proj", "layers.1.self_attn.kk_proj"): v
                                     for k, v in t.items()})
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': module 'model.layers.1.self_attn.kk_proj' does not exist in the base model "
        "(LlamaForCausalLM): was the adapter trained on another base model?"
    )


def test_module_that_is_not_linear(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    rewrite_weights(path, lambda t: {k.replace("layers.0.self_attn.q_proj", "layers.0.input_layernorm"): v
                                     for k, v in t.items()})
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': module 'model.layers.0.input_layernorm' is a LlamaRMSNorm, which X-LoRA cannot wrap; "
        "experts may target Linear and Conv1D modules, plain or quantised by bitsandbytes (load_in_8bit / "
        "load_in_4bit) or torchao: load the base unquantised or that way (GPTQ, AWQ and HQQ layers are not supported)"
    )


def test_a_quantised_layer_of_another_library_is_refused_naming_its_type(llama):
    class QuantLinear(torch.nn.Module):  # what GPTQ/AWQ kernels look like: not an nn.Linear
        def forward(self, x):
            return x

    base = llama.base()
    base.model.layers[1].mlp.down_proj = QuantLinear()
    with pytest.raises(ValueError, match=r"expert 'alpha': module 'model.layers.1.mlp.down_proj' is a QuantLinear, "
                                         r"which X-LoRA cannot wrap.*GPTQ, AWQ and HQQ"):
        load_expert("alpha", llama.expert_dirs["alpha"], base)


def test_half_a_pair_and_rank_mismatch(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    b_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    rewrite_weights(path, lambda t: {k: v for k, v in t.items() if k != b_key})
    with pytest.raises(ValueError, match=re.escape(
            "expert 'chem': module 'model.layers.0.self_attn.q_proj' has no lora_B weight")):
        load_expert("chem", path, base)
    # A and B consistent with each other and the base, but not with adapter_config.json's r=2
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "b")
    a_key = b_key.replace("lora_B", "lora_A")
    rewrite_weights(path, lambda t: {**t, a_key: torch.zeros(3, 32), b_key: torch.zeros(32, 3)})
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': module 'model.layers.0.self_attn.q_proj' has rank 3 but adapter_config.json says r=2; "
        "the adapter files do not belong together"
    )


def test_unexpected_and_missing_keys(tmp_path, llama, base):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    rewrite_weights(path, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=re.escape(
            "expert 'chem': unexpected key 'base_model.model.lm_head.weight' in adapter_model.safetensors")):
        load_expert("chem", path, base)
    save_file({}, str(path / WEIGHTS_NAME))
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == f"expert 'chem': {str(path / WEIGHTS_NAME)!r} holds no LoRA weights"


def test_dora_is_refused(tmp_path, base):
    path = peft_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': DoRA (use_dora=true) is not supported by X-LoRA (adapter_config.json has use_dora=True)"
    )
    # the weights betray DoRA even when the config flag is gone
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': key 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector' "
        "is a DoRA magnitude; DoRA is not supported"
    )


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_is_refused(tmp_path, base, bias):
    path = peft_adapter(base, tmp_path / bias, bias=bias)
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == f"expert 'chem': LoRA bias={bias!r} is not supported; retrain the expert with bias='none'"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lora_bias_is_refused(tmp_path, base):
    path = peft_adapter(base, tmp_path / "lb", lora_bias=True)
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': LoRA bias (lora_bias=true) is not supported by X-LoRA (adapter_config.json has lora_bias=True)"
    )
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "lora_bias": False}))
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': key 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias' is a LoRA bias; "
        "retrain the expert with lora_bias=False"
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embedding_target_is_refused(tmp_path, base):
    path = peft_adapter(base, tmp_path / "emb", target_modules=["embed_tokens"])
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        "expert 'chem': key 'base_model.model.model.embed_tokens.lora_embedding_A' adapts an embedding; "
        "embedding targets are not supported (retrain the expert without embed_tokens/wte in target_modules)"
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_output_layer_adapter_saved_with_its_base_copy(tmp_path, base):
    """PEFT's default save of an ``lm_head`` LoRA adds ``lm_head.base_layer.weight`` (a copy of the frozen base
    weight): it loads exactly as the copy-less save when the copy equals the base, and is refused, naming the key
    and the fix, when it does not (another base)."""
    kw = dict(seed=3, target_modules=["q_proj", "lm_head"])
    with_copy = peft_adapter(base, tmp_path / "auto", **kw)
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in load_file(str(with_copy / WEIGHTS_NAME))  # what PEFT writes by default
    torch.manual_seed(3)
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, r=2, lora_alpha=4,
                                                            target_modules=["q_proj", "lm_head"]))
    plain.save_pretrained(str(tmp_path / "plain"), save_embedding_layers=False)
    a, b = load_expert("e", with_copy, base), load_expert("e", tmp_path / "plain", base)
    assert sorted(a.modules) == sorted(b.modules) and "lm_head" in a.modules
    for m in a.modules:
        assert torch.equal(a.modules[m].A, b.modules[m].A) and torch.equal(a.modules[m].B, b.modules[m].B)
    in_bf16 = load_expert("e", with_copy, copy.deepcopy(base).to(torch.bfloat16))  # the copy is compared in bf16
    assert all(torch.equal(in_bf16.modules[m].A, a.modules[m].A) for m in a.modules)
    differs = re.escape(", and it differs from this base model's (or the module is missing)")

    def nudge(sd):
        sd[key] = sd[key].clone()
        sd[key][0, 0] += 1.0
        return sd
    rewrite_weights(with_copy, nudge)
    with pytest.raises(ValueError, match=re.escape(f"expert 'e': key {key!r} is a saved copy of the base weight of "
                                                   "module 'lm_head'") + differs):
        load_expert("e", with_copy, base)
    rewrite_weights(with_copy, lambda sd: {**sd, key: sd[key][:-1]})  # another vocabulary: shapes differ
    with pytest.raises(ValueError, match=differs):
        load_expert("e", with_copy, base)
    rewrite_weights(with_copy, lambda sd: {k.replace("lm_head.base", "model.head.base"): v for k, v in sd.items()})
    with pytest.raises(ValueError, match=re.escape("module 'model.head'") + differs):
        load_expert("e", with_copy, base)


@pytest.mark.parametrize("key, value, what", [
    ("modules_to_save", ["lm_head"], "modules_to_save (fully trained copies of modules)"),
    ("layer_replication", [[0, 2]], "layer_replication"),
    ("trainable_token_indices", [5], "trainable_token_indices"),
])
def test_other_unsupported_config_keys(tmp_path, llama, base, key, value, what):
    path = copy_adapter(llama.expert_dirs["beta"], tmp_path / "a")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError) as info:
        load_expert("chem", path, base)
    assert str(info.value) == (
        f"expert 'chem': {what} is not supported by X-LoRA (adapter_config.json has {key}={value!r})"
    )


def test_zero_experts(base):
    with pytest.raises(ValueError) as info:
        load_experts({}, base)
    assert str(info.value) == "no experts given: X-LoRA needs at least one LoRA expert"
    with pytest.raises(ValueError, match="experts is empty"):
        XLoraConfig(experts={})


def test_duplicate_names_at_config_level():
    with pytest.raises(ValueError) as info:
        XLoraConfig(experts=["chem=./a", "bio=./b", "chem=./c"])
    assert str(info.value) == "experts: duplicate expert name 'chem'; give every expert a distinct name"


def test_load_experts_names_the_failing_expert(tmp_path, llama, base):
    experts = {"alpha": str(llama.expert_dirs["alpha"]), "broken": str(tmp_path / "missing")}
    with pytest.raises(FileNotFoundError, match=re.escape("expert 'broken': adapter directory")):
        load_experts(experts, base)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_expert_weights_are_refused_naming_the_tensor(tmp_path, llama, base, bad):
    path = tmp_path / "broken"
    shutil.copytree(llama.expert_dirs["beta"], path)
    weights = load_file(str(path / WEIGHTS_NAME))
    key = sorted(k for k in weights if k.endswith("lora_B.weight"))[0]
    weights[key][0, 0] = bad
    save_file(weights, str(path / WEIGHTS_NAME))
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=re.escape(f"expert 'chem': {str(path / WEIGHTS_NAME)!r} tensor {key!r} "
                                                   f"holds 1 non-finite value(s) ({kind} among them")):
        load_expert("chem", path, base)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_base_copy_against_a_quantised_output_layer_is_refused_with_the_resave_fix(tmp_path, base):
    """The saved ``lm_head`` copy cannot be compared with a quantised base's ``lm_head`` (its weight is not a plain
    float tensor): refused, naming the key and ``save_embedding_layers=False``, rather than guessed."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install xlora[quant])")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    with_copy = peft_adapter(base, tmp_path / "auto", seed=3, target_modules=["q_proj", "lm_head"])
    quantised = copy.deepcopy(base)
    quantize_(quantised, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn == "lm_head")
    assert type(quantised.lm_head.weight) not in (torch.Tensor, torch.nn.Parameter)  # really quantised
    key = "base_model.model.lm_head.base_layer.weight"
    with pytest.raises(ValueError, match=re.escape(
            f"expert 'e': key {key!r} is a saved copy of the base weight of module 'lm_head', which cannot be checked "
            "against this base model's Linear (quantised?); re-save the adapter with save_pretrained(..., "
            "save_embedding_layers=False)")):
        load_expert("e", with_copy, quantised)
