"""The PEFT-style lifecycle of XLoraModel: disable_adapters, unload, parameter counts, gradient
checkpointing with exact recomputation, .to() and train()/eval()."""

from __future__ import annotations

import pytest
import torch
from conftest import make_expert, randomize_head, targets_of, tokens

from xlora import XLoraConfig, XLoraModel
from xlora.layers import MixtureLoraLinear


def build(setup, **cfg) -> XLoraModel:
    cfg.setdefault("head_hidden_size", 16)
    cfg.setdefault("head_depth", 2)
    model = XLoraModel(setup.base(), XLoraConfig(experts={k: str(v) for k, v in setup.expert_dirs.items()}, **cfg))
    randomize_head(model, 7, 0.5)
    return model.eval()


class PassCounter(XLoraModel):
    def scaling_pass(self, **inputs):
        self.scaling_passes += 1
        return super().scaling_pass(**inputs)


def test_disable_adapters_is_exactly_the_base_model_in_one_pass(llama):
    model = PassCounter(llama.base(), XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()},
                                                  head_hidden_size=16)).eval()
    model.scaling_passes = 0
    x = tokens()
    ref = llama.base()(x).logits
    with torch.no_grad(), model.disable_adapters():
        out = model(x, labels=x)
        assert torch.equal(model(x, scalings="alpha").logits, ref)  # even fixed scalings: the block wins
    assert model.scaling_passes == 0 and out.scalings is None
    assert torch.equal(out.logits, ref)
    with torch.no_grad():
        assert not torch.equal(model(x).logits, ref) and model.scaling_passes == 1  # back to X-LoRA after


def test_unload_returns_the_untouched_base(llama):
    original = llama.base()
    original.model.embed_tokens.weight.requires_grad_(False)  # a flag of the user's that unload must restore
    flags = {n: p.requires_grad for n, p in original.named_parameters()}
    before = {k: v.clone() for k, v in original.state_dict().items()}
    types = {n: type(m) for n, m in original.named_modules()}
    model = XLoraModel(original, XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}))
    model.gradient_checkpointing_enable()
    assert any(isinstance(m, MixtureLoraLinear) for m in original.modules())
    base = model.unload()
    assert base is original
    assert {n: type(m) for n, m in base.named_modules()} == types
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not base.is_activation_checkpointing  # switched on through the X-LoRA model: switched off again
    with pytest.raises(RuntimeError, match="was unload\\(\\)-ed"):
        model(tokens())


def test_wrapping_and_unloading_read_no_deprecated_transformers_api(llama):
    """transformers 5 deprecates ``is_gradient_checkpointing`` (a FutureWarning at every read): building,
    checkpointing and unloading go through ``is_activation_checkpointing``, the PEFT-style alias still works."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = XLoraModel(llama.base(), XLoraConfig(experts={k: str(v) for k, v in llama.expert_dirs.items()}))
        model.gradient_checkpointing_enable()
        assert model.is_activation_checkpointing and model.is_gradient_checkpointing
        model.activation_checkpointing_disable()  # transformers 5's names work as well
        assert not model.is_activation_checkpointing
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing
        base = model.unload()
        assert not base.is_activation_checkpointing


def test_parameter_counts(llama, capsys):
    model = build(llama)
    head = sum(p.numel() for p in model.head.parameters())
    experts = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.mixture_layers())
    base = sum(p.numel() for p in llama.base().parameters())
    assert model.get_nb_trainable_parameters() == (head, head + experts + base)
    assert model.num_parameters() == head + experts + base and model.num_parameters(only_trainable=True) == head
    embeddings = model.get_input_embeddings().weight.numel()  # the tiny Llama does not tie its LM head
    assert model.num_parameters(exclude_embeddings=True) == head + experts + base - embeddings
    model.print_trainable_parameters()
    total = head + experts + base
    assert capsys.readouterr().out == (f"trainable params: {head:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * head / total:.4f}\n")
    assert model.get_input_embeddings() is model.base_model.get_input_embeddings()


@pytest.fixture(scope="module")
def dropout_setup(llama, tmp_path_factory):
    """The llama setup with an expert that has LoRA dropout (so the recomputation must replay RNG)."""
    root = tmp_path_factory.mktemp("drop")
    expert = make_expert(llama.base(), root / "drop", r=4, alpha=8, targets=targets_of("llama"), seed=5, dropout=0.3)
    return {**{k: str(v) for k, v in llama.expert_dirs.items()}, "drop": str(expert)}


def head_grads(llama, experts, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = XLoraModel(llama.base(), XLoraConfig(experts=experts, head_depth=2, head_hidden_size=16,
                                                 head_dropout=0.1))
    randomize_head(model, 7, 0.5)
    if checkpointing:
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
    model.train()
    x = tokens(batch=3, seq=9)
    torch.manual_seed(11)
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.head.named_parameters()}


def test_gradient_checkpointing_recomputes_exactly(llama, dropout_setup):
    loss, ref = head_grads(llama, dropout_setup, checkpointing=False)
    loss_ckpt, got = head_grads(llama, dropout_setup, checkpointing=True)
    assert loss_ckpt.item() == pytest.approx(loss.item(), abs=1e-6)
    assert set(got) == set(ref)
    for name in ref:
        assert ref[name].abs().max() > 0
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_refuses_reentrant(llama):
    model = build(llama)
    with pytest.raises(ValueError, match="use_reentrant.*cannot replay the X-LoRA scalings"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable()
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_to_dtype_moves_base_experts_and_head_together(llama):
    model = build(llama)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        model.to(torch.float64)
        dtypes = {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()}
        assert dtypes == {torch.float64}
        got = model(x).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=1e-5)


def test_train_and_eval_reach_head_and_expert_dropout(llama):
    model = build(llama).train()
    layers = model.mixture_layers()
    assert model.head.training and all(layer.training for layer in layers)
    model.eval()
    assert not model.head.training and not any(layer.training for layer in layers)
    assert not any(m.training for m in model.modules())
