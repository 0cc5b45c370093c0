"""Saving and loading X-LoRA directories, and loading base models and tokenizers from local files only.

Our format: ``xlora_config.json`` (:class:`~xlora.config.XLoraConfig`) and
``xlora_head.safetensors`` (the scaling head's state dict); experts by absolute path, or copied
under ``experts/<name>/`` in PEFT's format when bundled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from xlora._io import atomic_save_safetensors, check_finite
from xlora.adapters import save_expert
from xlora.config import XLoraConfig

if TYPE_CHECKING:
    from xlora.model import XLoraModel

CONFIG_FILE = "xlora_config.json"
HEAD_FILE = "xlora_head.safetensors"
EXPERTS_DIR = "experts"


def save_model(model: XLoraModel, save_directory: str | os.PathLike, bundle: bool = False) -> None:
    """Write ``xlora_config.json`` and ``xlora_head.safetensors`` (atomically).

    Experts are referenced by absolute path; with ``bundle=True`` (or trainable experts, whose
    weights changed) they are written under ``experts/<name>/`` in PEFT's format, so the
    directory stands alone.
    """
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


def load_model(cls: type[XLoraModel], directory: str | os.PathLike,
               base_model: PreTrainedModel | str | os.PathLike | None = None, **model_kwargs: Any) -> XLoraModel:
    """Load a directory written by :func:`save_model`.

    Args:
        cls: the model class (:class:`~xlora.model.XLoraModel` or a subclass).
        directory: the X-LoRA directory.
        base_model: a loaded model, or a local path / cached model id for ``AutoModelForCausalLM``
            (``local_files_only=True`` unless ``model_kwargs`` say otherwise); defaults to the
            config's ``base_model_name_or_path``.
        model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"X-LoRA directory {str(directory)!r} does not exist")
    cfg = XLoraConfig.from_json_file(directory / CONFIG_FILE)
    if base_model is None:
        base_model = cfg.base_model_name_or_path
        if not base_model:
            raise ValueError(
                f"{str(directory / CONFIG_FILE)!r} names no base_model_name_or_path; pass base_model=... explicitly"
            )
    if not isinstance(base_model, PreTrainedModel):
        base_model = load_base(str(base_model), directory, **model_kwargs)
    model = cls(base_model, cfg, experts_root=directory)
    model.head.load_state_dict(read_head_state(directory / HEAD_FILE, model.head.state_dict()))
    return model


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


def load_base(name: str, directory: Path, **model_kwargs: Any) -> PreTrainedModel:
    """The base model recorded in (or given for) the X-LoRA directory ``directory``."""
    fix = (f"{str(directory)!r} names it as its base; pass the local base model folder with base_model=... "
           "(CLI: --base PATH)")
    return load_local(AutoModelForCausalLM, name, "the base model", fix, **model_kwargs).eval()


def load_model_and_tokenizer(directory: str | os.PathLike, base_model: str | None = None,
                             **model_kwargs: Any) -> tuple[XLoraModel, Any]:
    """Load an X-LoRA directory for inference, with the tokenizer saved in it or the base model's."""
    from transformers import AutoTokenizer

    from xlora.model import XLoraModel

    model = XLoraModel.from_pretrained(directory, base_model=base_model, **model_kwargs).eval()
    candidates = [Path(directory), base_model or model.xlora_config.base_model_name_or_path]
    for cand in candidates:
        if cand and Path(cand).is_dir() and any(
            (Path(cand) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            return model, AutoTokenizer.from_pretrained(str(cand))
    raise FileNotFoundError(
        f"no tokenizer in {str(directory)!r} nor in the base model folder {str(candidates[1])!r}; "
        "save one next to the model with tokenizer.save_pretrained(dir)"
    )
