"""XLoraModel: base/PEFT equivalences, parity with PEFT's XLoraModel, save/load, gradients."""

from __future__ import annotations

import re
import shutil

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_head, tokens
from peft import PeftModel

from xlora import XLoraConfig, XLoraModel

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]


def build(setup, **cfg) -> XLoraModel:
    cfg.setdefault("head_hidden_size", 16)
    config = XLoraConfig(experts={k: str(v) for k, v in setup.expert_dirs.items()}, **cfg)
    return XLoraModel(setup.base(), config).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_scalings_equal_base_model(setups, arch):
    setup = setups[arch]
    model = build(setup)
    x = tokens()
    ref = setup.base()(x).logits
    torch.testing.assert_close(model(x, scalings="zero").logits, ref, rtol=0, atol=0)
    # a head whose scalings are all zero (global weight 0) also gives the base model
    model.xlora_config.global_scaling_weight = 0.0
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_hot_scalings_equal_peft_single_adapter(setups, arch):
    setup = setups[arch]
    model = build(setup, global_scaling_weight=1.0)
    x = tokens()
    base_logits = setup.base()(x).logits
    for idx, (name, path) in enumerate(setup.expert_dirs.items()):
        ref = PeftModel.from_pretrained(setup.base(), str(path)).eval()(x).logits
        assert (ref - base_logits).abs().max() > 1e-3  # the expert really changes the output
        torch.testing.assert_close(model(x, scalings=name).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x, scalings=idx).logits, ref, rtol=0, atol=1e-5)


PARITY_GRID = [
    # depth, layerwise, softmax, top_k, softmax_topk, temperature, global weight
    (1, False, True, None, False, 1.0, 1.0),
    (1, True, True, None, False, 0.5, 1.0),
    (2, False, True, None, False, 1.0, 0.7),
    (2, True, False, None, False, 1.0, 1.0),
    (3, False, True, 2, False, 2.0, 1.0),
    (3, True, False, 2, True, 1.0, 1.3),
    (2, True, True, 1, True, 0.7, 0.5),
    (1, False, False, 2, False, 1.0, 2.0),
]


def peft_xlora(setup, depth, layerwise, softmax, top_k, softmax_topk, temperature, gsw):
    base = setup.base()
    base.config.use_cache = False  # PEFT's XLoraModel refuses a model with use_cache=True
    cfg = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
        adapters={str(i): str(p) for i, p in enumerate(setup.expert_dirs.values())},
        xlora_depth=depth, xlora_size=16, xlora_dropout_p=0.1, layerwise_scalings=layerwise,
        enable_softmax=softmax, top_k_lora=top_k, enable_softmax_topk=softmax_topk,
        softmax_temperature=temperature, global_scaling_weight=gsw,
    )
    return peft.get_peft_model(base, cfg).eval()


def topk_like_peft(s: torch.Tensor, k: int | None, resoftmax: bool) -> torch.Tensor:
    """PEFT applies top-k inside each layer, after the classifier; redo it on its latest scalings."""
    if k is not None:
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, -1).indices, True)
        s = s * mask
    if resoftmax:
        nz = s != 0
        s = torch.softmax(s.masked_fill(~nz, float("-inf")), -1).masked_fill(~nz, 0.0)
    return s


@pytest.mark.parametrize("params", PARITY_GRID, ids=lambda p: "d{}-lw{}-sm{}-k{}-smk{}-T{}-g{}".format(*p))
def test_parity_with_peft_xlora(llama, params):
    depth, layerwise, softmax, top_k, softmax_topk, temperature, gsw = params
    theirs = peft_xlora(llama, *params)
    ours = build(llama, head_depth=depth, head_dropout=0.1, layerwise_scalings=layerwise, enable_softmax=softmax,
                 top_k=top_k, enable_softmax_topk=softmax_topk, softmax_temperature=temperature,
                 global_scaling_weight=gsw)
    classifier = theirs.base_model.internal_xlora_classifier
    torch.manual_seed(11)
    with torch.no_grad():
        for p in classifier.parameters():
            p.normal_(0, 0.5)
    ours.head.layers.load_state_dict(classifier.layers.state_dict())
    x = tokens(batch=3, seq=9, seed=4)
    ref_logits = theirs(input_ids=x).logits
    ref_scalings = topk_like_peft(theirs.base_model.get_latest_scalings(), top_k, softmax_topk)
    out = ours(x)
    assert out.scalings.shape == (3, 9, ours.num_layers, 3) == ref_scalings.shape
    torch.testing.assert_close(out.scalings, ref_scalings, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-5)
    # and the mixture is not trivially the base model
    assert (out.logits - llama.base()(x).logits).abs().max() > 1e-3


def test_loss_is_causal_lm_cross_entropy(llama):
    model = build(llama)
    randomize_head(model)
    x = tokens(batch=2, seq=8)
    labels = x.clone()
    labels[0, :3] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_scalings_depend_only_on_past_tokens(llama):
    model = build(llama, head_depth=2, layerwise_scalings=True)
    randomize_head(model)
    x = tokens(batch=1, seq=10)
    full = model(x)
    prefix = model(x[:, :6])
    torch.testing.assert_close(full.scalings[:, :6], prefix.scalings, rtol=0, atol=1e-6)
    torch.testing.assert_close(full.logits[:, :6], prefix.logits, rtol=0, atol=1e-5)


def test_fixed_scalings_forms(llama):
    model = build(llama)
    x = tokens()
    E, L = model.num_experts, model.num_layers
    uniform = model(x, scalings="uniform")
    assert torch.equal(uniform.scalings, torch.full((2, 7, L, E), 1 / E))
    torch.testing.assert_close(model(x, scalings=torch.full((E,), 1 / E)).logits, uniform.logits, rtol=0, atol=0)
    with model.fixed_scalings("beta"):
        beta = model(x)
    assert torch.equal(beta.scalings[..., 1], torch.ones(2, 7, L)) and beta.scalings.sum() == 2 * 7 * L
    with model.fixed_scalings(torch.full((2, 7, L, E), 1 / E)):
        torch.testing.assert_close(model(x).logits, uniform.logits, rtol=0, atol=0)
    assert not hasattr(model, "fix_scalings")  # one way to fix scalings: the argument or the context manager
    randomize_head(model)
    assert not torch.allclose(model(x).scalings, uniform.scalings)
    with pytest.raises(ValueError, match="'delta' names no expert"):
        model(x, scalings="delta")
    with pytest.raises(ValueError, match=r"scalings=3 is not an expert index; use 0..2"):
        model(x, scalings=3)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        model(x, scalings=torch.ones(5))
    with pytest.raises(ValueError, match="batch 2 x length 7"):
        model(x, scalings=torch.ones(1, 3, L, E))
    # [b, L, E]: each sequence its own mixture at every position, here base model and expert beta
    per_seq = torch.stack([model.resolve_scalings("zero"), model.resolve_scalings("beta")])
    both = model(x, scalings=per_seq).logits
    torch.testing.assert_close(both[0], model(x[:1], scalings="zero").logits[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[1], model(x[1:], scalings="beta").logits[0], rtol=0, atol=1e-6)
    with model.fixed_scalings(per_seq):  # generation: the prompt, then one position per step
        out = model.generate(x, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    for i, spec in enumerate(("zero", "beta")):
        with model.fixed_scalings(spec):
            assert torch.equal(out[i], model.generate(x[i:i + 1], max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                                      pad_token_id=0)[0])
    with pytest.raises(ValueError, match=rf"per-sequence fixed scalings of shape \(2, {L}, {E}\) do not match the "
                                         r"input's batch 4; .*repeat_interleave"), model.fixed_scalings(per_seq):
        model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0, num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match=r"batch 2 x length 7"):  # a one-position tensor is not broadcast
        model(x, scalings=per_seq.unsqueeze(1))


def test_save_load_gives_identical_logits(llama, tmp_path):
    model = build(llama, head_depth=2, layerwise_scalings=True, top_k=2)
    randomize_head(model)
    x = tokens()
    before = model(x)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["xlora_config.json", "xlora_head.safetensors"]
    loaded = XLoraModel.from_pretrained(tmp_path / "ckpt", base_model=str(llama.base_dir)).eval()
    assert loaded.xlora_config == model.xlora_config
    after = loaded(x)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.scalings, before.scalings)
    # the base model path is remembered in the config
    again = XLoraModel.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(again(x).logits, before.logits)


def test_bundled_directory_stands_alone(llama, tmp_path):
    experts = {}
    for name, path in llama.expert_dirs.items():
        experts[name] = str(shutil.copytree(path, tmp_path / "orig" / name))
    model = XLoraModel(llama.base(), XLoraConfig(experts=experts, head_hidden_size=16)).eval()
    randomize_head(model)
    x = tokens()
    before = model(x).logits
    model.save_pretrained(tmp_path / "bundle", bundle=True)
    for name in experts:
        src, dst = tmp_path / "orig" / name, tmp_path / "bundle" / "experts" / name
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (src / f).read_bytes() == (dst / f).read_bytes()
    shutil.rmtree(tmp_path / "orig")
    loaded = XLoraModel.from_pretrained(tmp_path / "bundle", base_model=llama.base()).eval()
    assert torch.equal(loaded(x).logits, before)
    # a non-bundled save of the deleted experts cannot load, and says which expert is missing
    model.save_pretrained(tmp_path / "ref")
    with pytest.raises(FileNotFoundError, match="expert 'alpha'"):
        XLoraModel.from_pretrained(tmp_path / "ref", base_model=llama.base())


def test_gradients_reach_only_the_head(llama):
    model = build(llama, head_depth=2)
    model.train()
    x = tokens()
    model(x, labels=x).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


def test_trainable_experts_get_gradients_and_save(llama, tmp_path):
    model = build(llama, use_trainable_adapters=True)
    model.train()
    x = tokens()
    model(x, labels=x).loss.backward()
    lora = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert lora and all(n.endswith(("lora_A", "lora_B")) for n in lora)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n or "embed" in n)
    # change the experts, save (experts are written because they were trained), reload identically
    with torch.no_grad():
        for n in lora:
            model.get_parameter(n).add_(0.01)
    model.eval()
    before = model(x).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "experts" / "gamma" / "adapter_model.safetensors").is_file()
    loaded = XLoraModel.from_pretrained(tmp_path / "ckpt", base_model=llama.base()).eval()
    torch.testing.assert_close(loaded(x).logits, before, rtol=0, atol=1e-6)
    # and the saved experts are valid PEFT adapters
    for i, name in enumerate(model.xlora_config.expert_names):
        ref = PeftModel.from_pretrained(llama.base(), str(tmp_path / "ckpt" / "experts" / name)).eval()(x).logits
        torch.testing.assert_close(loaded(x, scalings=i).logits, ref, rtol=0, atol=1e-5)


def test_base_model_is_adapted_in_place_not_copied(llama):
    base = llama.base()
    ptrs = {p.data_ptr() for p in base.parameters()}
    model = XLoraModel(base, XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}))
    base_params = {p.data_ptr() for n, p in model.base_model.named_parameters() if "lora_" not in n}
    assert base_params == ptrs


def test_head_mismatch_and_hidden_size_errors(llama, setups, tmp_path):
    model = build(llama, head_depth=2)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = XLoraConfig(experts={"a": str(llama.expert_dirs["alpha"])}, hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size=48 but the base model's hidden size is 32"):
        XLoraModel(llama.base(), cfg)
    # a head file that does not fit the config (depth edited by hand) is refused with both layouts
    cfg_file = tmp_path / "ckpt" / "xlora_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"head_depth": 2', '"head_depth": 1'))
    with pytest.raises(ValueError, match=r"does not fit the config's head: file has .*layers.3.weight"):
        XLoraModel.from_pretrained(tmp_path / "ckpt", base_model=llama.base())
    (tmp_path / "ckpt" / "xlora_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="xlora_head.safetensors' is not a readable safetensors file"):
        XLoraModel.from_pretrained(tmp_path / "ckpt", base_model=llama.base())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        XLoraModel.from_pretrained(tmp_path / "nope", base_model=llama.base())
    # a base model that is neither a local folder nor cached: a clear error, no download attempt
    with pytest.raises(FileNotFoundError, match=r"base model 'no-such-org/no-such-model': it is not a local directory.*--base PATH"):
        XLoraModel.from_pretrained(tmp_path / "ckpt", base_model="no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match=r"base model '.*ckpt': it is a local directory that does not hold a model"):
        XLoraModel.from_pretrained(tmp_path / "ckpt", base_model=str(tmp_path / "ckpt"))


def test_the_callers_config_is_not_mutated(llama):
    config = XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()})
    before = config.to_dict()
    model = XLoraModel(llama.base(), config)
    assert config.to_dict() == before and config.hidden_size is None and config.num_adapted_modules is None
    assert model.xlora_config is not config
    assert (model.xlora_config.hidden_size, model.xlora_config.num_adapted_modules) == (32, model.num_layers)
    XLoraModel(llama.base(), config)  # the same config builds a second model


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_saved_head_with_non_finite_values_is_refused(llama, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    model = build(llama, head_depth=2)
    model.save_pretrained(tmp_path / "ckpt")
    head = tmp_path / "ckpt" / "xlora_head.safetensors"
    state = load_file(str(head))
    name = sorted(state)[-1]
    state[name].view(-1)[3] = bad
    save_file(state, str(head))
    with pytest.raises(ValueError, match=re.escape(f"{str(head)!r}: tensor {name!r} holds 1 non-finite value(s)")):
        XLoraModel.from_pretrained(tmp_path / "ckpt", base_model=llama.base())


def test_an_expert_on_the_output_layer(llama, tmp_path):
    """Experts that adapt ``lm_head`` (saved by PEFT without the embedding copy): one-hot scalings equal PEFT's
    adapter; ``logits_to_keep`` (an int, as ``generate`` passes at prefill, or indices) gives exactly the kept
    slice of the full logits; cached greedy decoding gives the tokens of full recomputation."""
    from decoding import left_padded_batch, reference_greedy

    base, experts = llama.base(), {}
    for i, targets in enumerate((["q_proj", "lm_head"], ["v_proj", "lm_head"])):
        torch.manual_seed(i + 1)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(llama.base(), cfg).save_pretrained(str(tmp_path / f"e{i}"), save_embedding_layers=False)
        experts[f"e{i}"] = str(tmp_path / f"e{i}")
    model = XLoraModel(llama.base(), XLoraConfig(experts=experts, head_hidden_size=16)).eval()
    randomize_head(model, seed=5)
    x = tokens()
    ref = PeftModel.from_pretrained(base, experts["e0"]).eval()(x).logits
    torch.testing.assert_close(model(x, scalings="e0").logits, ref, rtol=0, atol=1e-5)
    full = model(x).logits
    assert torch.equal(model(x, logits_to_keep=1).logits, full[:, -1:])
    assert torch.equal(model(x, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])
    ids, mask = left_padded_batch()
    expected, _, _ = reference_greedy(model, ids, mask, steps=5)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
