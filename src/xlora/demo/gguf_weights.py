"""A Llama-architecture GGUF file as a Hugging Face config and state dict, read once with the ``gguf`` package.

transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) parses the file's metadata three
times (config, tokenizer, weights) and rebuilds the tensor-name map once per submodule: 21 s for
SmolLM2-135M on two cores, most of the demo's first-run conversion. This module reads config and weights
from one parse and maps names with ``gguf.get_tensor_name_map`` once (the tokenizer is still transformers'
conversion, a second parse): 9 s. For the demo's file every written file is byte-identical to what
transformers' loader writes (``tests/demo/test_gguf_weights.py``). Only plain Llama files are read here:
another architecture, a Llama file transformers reads as Mistral (``general.name`` says so), rope scaling,
or a tensor the model has no place for is refused (:func:`direct_support` says which), and
``convert_gguf`` then uses transformers.

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
_FALLBACK = "convert it with transformers' from_pretrained(..., gguf_file=...)"


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"the GGUF file has no metadata {key!r}; {_FALLBACK}")
    return value


def architecture(reader: Any) -> str:
    """The file's ``general.architecture`` (``"llama"``, ``"qwen2"``, ...)."""
    return str(_required(reader, "general.architecture"))


def direct_support(reader: Any) -> str | None:
    """``None`` when this module reads the file exactly as transformers would, else why not."""
    arch = architecture(reader)
    if arch not in SUPPORTED:
        return f"GGUF architecture {arch!r}: only {SUPPORTED} is read directly"
    if "mistral" in str(_field(reader, "general.name", "")).lower():
        return "a llama-architecture file named Mistral (transformers reads it as a MistralConfig)"
    scaling = [k for k in reader.fields if k.startswith(f"{arch}.rope.scaling")]
    if scaling or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        return f"rope scaling ({', '.join(scaling) or 'rope_freqs.weight'}) is not read directly"
    return None


def llama_config(reader: Any) -> Any:
    """The ``LlamaConfig`` the file's metadata describes (the fields transformers' loader reads for llama).

    Raises:
        ValueError: :func:`direct_support` refuses the file, or a required metadata key is missing.
    """
    from transformers import LlamaConfig

    reason = direct_support(reader)
    if reason:
        raise ValueError(f"{reason}; {_FALLBACK}")
    a = f"{architecture(reader)}."
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        raise ValueError(f"the GGUF file has neither {a}vocab_size nor tokenizer.ggml.tokens; {_FALLBACK}")
    kw = dict(
        num_hidden_layers=int(_required(reader, a + "block_count")),
        max_position_embeddings=int(_required(reader, a + "context_length")),
        hidden_size=int(_required(reader, a + "embedding_length")),
        intermediate_size=int(_required(reader, a + "feed_forward_length")),
        num_attention_heads=int(_required(reader, a + "attention.head_count")),
        num_key_value_heads=int(_field(reader, a + "attention.head_count_kv")
                                or _required(reader, a + "attention.head_count")),
        rms_norm_eps=float(np.float32(_required(reader, a + "attention.layer_norm_rms_epsilon"))),
        vocab_size=int(vocab),
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


def llama_state_dict(reader: Any, config: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``{hf name: float32 tensor}`` for every name in ``shapes`` (a Hugging Face Llama model's state-dict
    names and shapes), dequantised; ``lm_head.weight`` is omitted when the embeddings are tied.

    Raises:
        ValueError: a name has no tensor in the file, a tensor's shape differs from the model's, or the file
            holds tensors the model has no place for.
    """
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    out, used = {}, set()
    for key, shape in shapes.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = key.rsplit(".", 1)
        name = name_map.get_name(stem)
        if name is None or f"{name}.{suffix}" not in tensors:
            raise ValueError(f"the GGUF file has no tensor for {key!r} (looked for {name}.{suffix})")
        t = tensors[f"{name}.{suffix}"]
        used.add(t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"the GGUF tensor {t.name} has shape {tuple(w.shape)} but {key} needs {tuple(shape)}: "
                             f"the file's metadata and tensors disagree; {_FALLBACK}")
        if name.endswith(".attn_q"):
            w = unpermute(w, config.num_attention_heads)
        elif name.endswith(".attn_k"):
            w = unpermute(w, config.num_key_value_heads)
        out[key] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy, not the file's memory map
    if unused := sorted(set(tensors) - used):
        raise ValueError(f"the GGUF file holds tensors a Llama model has no place for: {unused[:5]}; {_FALLBACK}")
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
    with torch.device("meta"):  # only the names and shapes: no memory, no random initialisation
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    weights = llama_state_dict(reader, config, shapes)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    return out
