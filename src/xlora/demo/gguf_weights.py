"""A Llama-architecture GGUF file as a Hugging Face config and state dict, read once with the ``gguf`` package.

transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) parses the file's metadata three
times (config, tokenizer, weights) and rebuilds the tensor-name map once per submodule: 21 s for
SmolLM2-135M on two cores, most of the demo's first-run conversion. This module parses it once and maps
names with ``gguf.get_tensor_name_map`` once. The result is bit-identical to transformers' loader
(``tests/demo/test_gguf_weights.py`` compares every tensor and the config); architectures other than
``llama`` are left to transformers.

Two things the file stores differently from Hugging Face:

- llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` per head (rotary halves
  interleaved): a ``[n_head · 2 · d, in]`` weight is stored as ``w.view(n_head, 2, d, in).swapaxes(1, 2)``;
  :func:`unpermute` undoes it.
- A model with tied embeddings has no ``output.weight``; ``lm_head.weight`` is left to the tie.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUPPORTED = ("llama",)


def architecture(reader: Any) -> str:
    """The file's ``general.architecture`` (``"llama"``, ``"qwen2"``, ...)."""
    return str(reader.fields["general.architecture"].contents())


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config(reader: Any) -> Any:
    """The ``LlamaConfig`` the file's metadata describes (the fields transformers' loader reads for llama).

    Raises:
        ValueError: the file's architecture is not ``llama``.
    """
    from transformers import LlamaConfig

    arch = architecture(reader)
    if arch not in SUPPORTED:
        raise ValueError(f"GGUF architecture {arch!r}: only {SUPPORTED} is read directly; "
                         "load it with transformers' from_pretrained(..., gguf_file=...)")
    a = f"{arch}."
    names = {t.name for t in reader.tensors}
    kw = dict(
        num_hidden_layers=int(_field(reader, a + "block_count")),
        max_position_embeddings=int(_field(reader, a + "context_length")),
        hidden_size=int(_field(reader, a + "embedding_length")),
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_attention_heads=int(_field(reader, a + "attention.head_count")),
        num_key_value_heads=int(_field(reader, a + "attention.head_count_kv")),
        rms_norm_eps=float(np.float32(_field(reader, a + "attention.layer_norm_rms_epsilon"))),
        vocab_size=int(_field(reader, a + "vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])))),
        rope_parameters={"rope_theta": float(np.float32(_field(reader, a + "rope.freq_base", 10000.0))),
                         "rope_type": "default"},
        tie_word_embeddings="output.weight" not in names,
        dtype=torch.float32,
    )
    if _field(reader, "general.name") is not None:
        kw["_model_name_or_path"] = str(_field(reader, "general.name"))  # as transformers' loader records it
    head_dim = _field(reader, a + "rope.dimension_count")
    if head_dim is not None:
        kw["head_dim"] = int(head_dim)
    for token, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id"),
                       ("unknown", "unk_token_id")):
        value = _field(reader, f"tokenizer.ggml.{token}_token_id")
        if value is not None:
            kw[key] = int(value)
    return LlamaConfig(**kw)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of ``q_proj``/``k_proj``: ``[n_head · 2 · d, ...]`` rows
    stored as ``(n_head, d, 2)`` go back to ``(n_head, 2, d)``."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def llama_state_dict(reader: Any, config: Any, keys: list[str]) -> dict[str, torch.Tensor]:
    """``{hf name: float32 tensor}`` for every name in ``keys`` (a Hugging Face Llama model's state-dict
    names), dequantised; ``lm_head.weight`` is omitted when the embeddings are tied.

    Raises:
        ValueError: a name has no tensor in the file.
    """
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for key in keys:
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = key.rsplit(".", 1)
        name = name_map.get_name(stem)
        if name is None or f"{name}.{suffix}" not in tensors:
            raise ValueError(f"the GGUF file has no tensor for {key!r} (looked for {name}.{suffix})")
        t = tensors[f"{name}.{suffix}"]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if name.endswith(".attn_q"):
            w = unpermute(w, config.num_attention_heads)
        elif name.endswith(".attn_k"):
            w = unpermute(w, config.num_key_value_heads)
        out[key] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy, not the file's memory map
    return out


def write_llama_dir(reader: Any, gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a Llama GGUF file (``reader``: its ``gguf.GGUFReader``) as a safetensors model directory (config,
    generation config, weights, tokenizer) in ``out_dir``; the tokenizer is transformers' conversion of the
    file's vocabulary."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, out = Path(gguf_path), Path(out_dir)
    config = llama_config(reader)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):  # only the names: no memory, no random initialisation
        keys = list(AutoModelForCausalLM.from_config(config).state_dict())
    weights = llama_state_dict(reader, config, keys)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    return out
