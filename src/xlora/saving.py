"""Saving and loading X-LoRA directories, and loading base models and tokenizers from local files only.

Our format: ``xlora_config.json`` (:class:`~xlora.config.XLoraConfig`) and
``xlora_head.safetensors`` (the scaling head's state dict); experts by absolute path, or copied
under ``experts/<name>/`` in PEFT's format when bundled. Other formats are read by
:mod:`xlora.formats` as plain data (a config and the head's tensors); :func:`load_model` builds the
model from either. Nothing here imports the model class: it is passed in (``cls``), so the
imports run one way, ``model`` -> ``saving`` -> ``formats``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from xlora import formats
from xlora.adapters import save_expert
from xlora.config import CONFIG_FILE, HEAD_FILE, XLoraConfig
from xlora.files import atomic_save_safetensors, check_finite

EXPERTS_DIR = "experts"
TRAINER_WEIGHTS_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: what Trainer resumes from


def save_model(model: nn.Module, save_directory: str | os.PathLike, bundle: bool = False, format: str = "ours") -> None:
    """Write ``xlora_config.json`` and ``xlora_head.safetensors`` (atomically).

    Experts are referenced by absolute path; with ``bundle=True`` (or trainable experts, whose
    weights changed) they are written under ``experts/<name>/`` in PEFT's format, so the
    directory stands alone. ``format`` ``"peft"``, ``"original"`` or ``"mistralrs"`` writes that
    format instead (see :mod:`xlora.formats`).
    """
    if format != "ours":
        return formats.save(model, save_directory, format, bundle=bundle)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = XLoraConfig.from_dict(model.xlora_config.to_dict())
    copy_experts = bundle or cfg.use_trainable_adapters
    trained = model.trainable_expert_weights() if cfg.use_trainable_adapters else None
    experts = {}
    for i, expert in enumerate(model.experts):
        if copy_experts:
            rel = Path(EXPERTS_DIR) / expert.name
            save_expert(expert, out / rel, trained[i] if trained else None)
            experts[expert.name] = rel.as_posix()
        else:
            experts[expert.name] = str(expert.path.resolve())
    cfg.experts = experts
    atomic_save_safetensors(out / HEAD_FILE, model.head.state_dict(), metadata={"format": "pt"})
    cfg.to_json_file(out / CONFIG_FILE)


def save_trainer_weights(model: nn.Module, save_directory: str | os.PathLike,
                         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trainable tensors of ``model`` to ``model.safetensors`` under its parameter names (what
    Hugging Face's ``Trainer`` reloads on resume), taken from ``state_dict`` when given (a gathered one)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = {n: source[n].detach().contiguous() for n in trainable}
    atomic_save_safetensors(Path(save_directory) / TRAINER_WEIGHTS_FILE, tensors, metadata={"format": "pt"})


def load_model(cls: type[nn.Module], directory: str | os.PathLike,
               base_model: PreTrainedModel | str | os.PathLike | None = None,
               ordering: str | os.PathLike | None = None, **model_kwargs: Any) -> Any:
    """Build a ``cls`` (:class:`~xlora.model.XLoraModel` or a subclass) from a directory in any format.

    Args:
        cls: the model class, called as ``cls(base_model, config, experts_root=...)``.
        directory: the X-LoRA directory (ours, the original package's, PEFT's or mistral.rs's).
        base_model: a loaded model, or a local path / cached model id for ``AutoModelForCausalLM``
            (``local_files_only=True`` unless ``model_kwargs`` say otherwise); defaults to the
            config's ``base_model_name_or_path``.
        ordering: mistral.rs's ordering file, when it is not inside ``directory``.
        model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
    """
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"X-LoRA directory {str(directory)!r} is a file; give the folder save_pretrained wrote")
    if not directory.is_dir():
        raise FileNotFoundError(f"X-LoRA directory {str(directory)!r} does not exist")
    kind = "mistralrs" if ordering is not None else formats.detect(directory)
    if kind != "ours":  # the original package's, PEFT's or mistral.rs's format: plain data, then the model
        foreign = formats.read(directory, kind, ordering)
        model = cls(resolve_base(base_model, foreign.config, directory, **model_kwargs), foreign.config)
        formats.attach_head(model, foreign, directory)
        return model
    cfg = XLoraConfig.from_json_file(directory / CONFIG_FILE)
    model = cls(resolve_base(base_model, cfg, directory, **model_kwargs), cfg, experts_root=directory)
    model.head.load_state_dict(read_head_state(directory / HEAD_FILE, model.head.state_dict()))
    return model


def resolve_base(base_model: PreTrainedModel | str | os.PathLike | None, cfg: XLoraConfig, directory: Path,
                 **model_kwargs: Any) -> PreTrainedModel:
    """``base_model`` as a loaded model: as given, loaded from the path given, or from the config's record."""
    if base_model is None:
        base_model = cfg.base_model_name_or_path
        if not base_model:
            raise ValueError(f"{str(directory)!r} names no base model (base_model_name_or_path); pass "
                             "base_model=... (CLI: --base PATH)")
    if isinstance(base_model, PreTrainedModel):
        return base_model
    return load_base(str(base_model), directory, given=base_model != cfg.base_model_name_or_path, **model_kwargs)


def read_head_state(head_file: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's tensors from ``head_file``, checked against ``expected`` (names, shapes, finite values)."""
    if not head_file.is_file():
        raise FileNotFoundError(f"{str(head_file)!r} is missing: the X-LoRA directory is incomplete")
    try:
        state = load_file(str(head_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{str(head_file)!r} is not a readable safetensors file ({err})") from None
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        raise ValueError(f"{str(head_file)!r} does not fit the config's head: file has {got}, config needs {want}")
    for name, tensor in state.items():
        check_finite(tensor, f"{str(head_file)!r}: tensor {name!r}", "retrain or restore the head")
    return state


def load_local(loader: Any, name: str, what: str, fix: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, local_files_only=True)`` (a model or tokenizer class), with an
    error naming ``what`` was being loaded, why it failed and ``fix`` instead of transformers' trace.

    Nothing is downloaded: ``name`` is a local folder or a model id already in the Hugging Face cache.
    A folder holding only a pickle checkpoint (``pytorch_model.bin``) is refused the same way:
    transformers would unpickle it, which can run arbitrary code.
    """
    folder = Path(name)
    if folder.is_dir() and "gguf_file" not in kwargs and not any(folder.glob("*.safetensors")) \
            and any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"cannot load {what} {name!r}: it holds only a pickle checkpoint (pytorch_model.bin), which xlora never "
            "unpickles (it can run arbitrary code); convert it once where you trust it with "
            f"model.save_pretrained(dir) (safetensors), then pass that folder; {fix}")
    try:
        return loader.from_pretrained(name, **{"local_files_only": True, **kwargs})
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    except Exception as err:  # noqa: BLE001 - e.g. UnpicklingError from a pickle-only checkpoint
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    where = "a local directory that does not hold a model" if Path(name).is_dir() else \
        "not a local directory, nor a model in the Hugging Face cache"
    raise FileNotFoundError(f"cannot load {what} {name!r}: it is {where} ({reason}); {fix}") from None


BASE_DTYPES = ("float32", "bfloat16", "float16")


def base_load_kwargs(dtype: str | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                     quant_type: str = "nf4") -> dict[str, Any]:
    """``AutoModelForCausalLM.from_pretrained`` keyword arguments for a half-precision or quantised base.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (None: the checkpoint's own); with a
            4-bit base, the compute dtype of its matmuls.
        load_in_8bit / load_in_4bit: quantise the base with bitsandbytes while loading (``pip install
            xlora[quant]``); at most one of them.
        quant_type: the 4-bit data type, ``"nf4"`` or ``"fp4"``.
    """
    if dtype is not None and dtype not in BASE_DTYPES:
        raise ValueError(f"dtype must be one of {BASE_DTYPES} or None (the checkpoint's), got {dtype!r}")
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit exclude each other: choose one quantisation")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)} if dtype else {}
    if load_in_8bit or load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("load_in_8bit / load_in_4bit need bitsandbytes: pip install 'xlora[quant]'") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=kwargs.get("dtype", torch.float32))
    return kwargs


def load_base(name: str, directory: Path, given: bool = False, **model_kwargs: Any) -> PreTrainedModel:
    """The base model recorded in (``given=False``) or given for the X-LoRA directory ``directory``."""
    fix = ("it was given as the base (base_model=..., CLI: --base PATH); give the local folder of the base model"
           if given else f"{str(directory)!r} names it as its base; pass the local base model folder with "
           "base_model=... (CLI: --base PATH)")
    return load_local(AutoModelForCausalLM, name, "the base model", fix, **model_kwargs).eval()
