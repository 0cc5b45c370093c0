"""A self-contained X-LoRA example: a tiny Llama and two PEFT experts built in-process, no download."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

from xlora.config import XLoraConfig
from xlora.model import XLoraModel


def build_tiny_xlora(workdir: Path, seed: int = 0) -> XLoraModel:
    """Build a 2-layer Llama, save two random PEFT LoRA experts under ``workdir``, wrap them in X-LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    experts = {}
    for i, (name, targets) in enumerate({"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                         "mlp": ["gate_proj", "up_proj", "down_proj"]}.items()):
        torch.manual_seed(seed + 1 + i)
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                        init_lora_weights=False))
        peft_model.save_pretrained(str(workdir / name))
        experts[name] = str(workdir / name)
    model = XLoraModel(base, XLoraConfig(experts=experts, head_depth=2, head_hidden_size=32)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.3)
    return model


def run_example(seq_len: int = 8) -> torch.Tensor:
    """Print the layer-averaged scalings of every token of a random sequence; returns them ``[t, E]``."""
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_xlora(Path(tmp))
        ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            out = model(ids)
        per_token = out.scalings[0].mean(dim=1)  # [t, E]
        names = model.xlora_config.expert_names
        print(f"X-LoRA over a tiny Llama: {model.num_layers} adapted modules x {model.num_experts} experts {names}")
        print("token  " + "  ".join(f"{n:>9}" for n in names))
        for t, row in enumerate(per_token.tolist()):
            print(f"{t:5d}  " + "  ".join(f"{v:9.3f}" for v in row))
        return per_token
