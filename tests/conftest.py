"""Tiny models, tokenizer-free, and PEFT experts built in-process; nothing touches the network."""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest_plugins = ["serve_models"]  # the server tests' shared fixtures (model_dir, ref)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
# The one place the tests take their device from: XLORA_TEST_DEVICE (e.g. "cuda"), else the CPU. Opt-in, because
# only the fixtures built on Setup.base(), tokens() and left_padded_batch follow it so far; the rest build on the CPU.
DEVICE = torch.device(os.environ.get("XLORA_TEST_DEVICE") or "cpu")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_model(arch: str, seed: int = 0):
    """A randomly initialised tiny causal LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII) with a chat template; fits VOCAB."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def targets_of(arch: str) -> list[str]:
    return GPT2_TARGETS if arch == "gpt2" else LLAMA_TARGETS


def make_expert(base, path: Path, *, r: int, alpha: float, targets: list[str], seed: int,
                rslora: bool = False, dropout: float = 0.0) -> Path:
    """Train-free PEFT expert with random A and B (``init_lora_weights=False``), saved with PEFT."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                   use_rslora=rslora, lora_dropout=dropout),
    )
    # Shrink B so that experts perturb rather than swamp the tiny base model.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(str(path))
    return path


@dataclass
class Setup:
    arch: str
    base_dir: Path
    expert_dirs: dict[str, Path]

    def base(self):
        return AutoModelForCausalLM.from_pretrained(str(self.base_dir)).to(DEVICE).eval()


def build_setup(root: Path, arch: str) -> Setup:
    base = tiny_model(arch)
    base_dir = root / f"{arch}-base"
    base.save_pretrained(str(base_dir))
    tiny_tokenizer().save_pretrained(str(base_dir))
    t = targets_of(arch)
    experts = {
        "alpha": make_expert(base, root / f"{arch}-alpha", r=4, alpha=8, targets=t, seed=1),
        # heterogeneous rank and alpha, rsLoRA, and fewer targets: attention only
        "beta": make_expert(base, root / f"{arch}-beta", r=2, alpha=3, targets=t[:2], seed=2, rslora=True),
        "gamma": make_expert(base, root / f"{arch}-gamma", r=8, alpha=4, targets=t[-2:], seed=3),
    }
    return Setup(arch, base_dir, experts)


@pytest.fixture(scope="session")
def setups(tmp_path_factory) -> dict[str, Setup]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_setup(root, arch) for arch in ("llama", "mistral", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def llama(setups) -> Setup:
    return setups["llama"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers and process groups)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def randomize_head(model, seed: int = 7, std: float = 0.5) -> None:
    """Give the scaling head random weights (a fresh head routes almost uniformly: tests need a router)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, std)


def demo_model(root: Path, domains: list[str], **xlora_options):
    """The demo tests' tiny X-LoRA: a Llama saved with its tokenizer in ``root/base``, one PEFT expert per
    domain (named like it) and a random head. Returns ``(model, tokenizer, base_dir, experts)``."""
    from xlora import XLoraConfig, XLoraModel

    base, tok, base_dir = tiny_model("llama"), tiny_tokenizer(), root / "base"
    base.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    experts = {d: str(make_expert(base, root / d, r=4, alpha=8, targets=LLAMA_TARGETS, seed=i + 1))
               for i, d in enumerate(domains)}
    model = XLoraModel(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval(),
                       XLoraConfig(experts=experts, **xlora_options)).eval()
    randomize_head(model, seed=0)  # a non-uniform router
    return model, tok, base_dir, experts


def tokens(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g).to(DEVICE)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second OpenMP thread mostly waits (10-60x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
