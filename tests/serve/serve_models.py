"""The tiny X-LoRA model the server tests share, built once per session and saved to a temporary folder,
and its fixtures ``model_dir`` and ``ref`` (a pytest plugin, registered by the root conftest's
``pytest_plugins``; a module may override either with a fixture of its own).

(A helper module rather than ``tests/serve/conftest.py``: the suite imports the root conftest as
``conftest``, and a second non-package conftest would replace it in ``sys.modules``.)
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import LLAMA_TARGETS, make_expert, randomize_head, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from xlora import XLoraConfig, XLoraModel
from xlora.pretrained import load_model_and_tokenizer

EXPERTS = ["alpha", "beta", "gamma"]
_BUILT: dict[str, Path] = {}


def build_model_dir(tmp_path_factory) -> Path:
    """An X-LoRA directory over a tiny Llama (context 1024, char tokenizer) with three experts."""
    if "dir" in _BUILT:
        return _BUILT["dir"]
    root = tmp_path_factory.mktemp("serve")
    base = tiny_model("llama")
    base.config.max_position_embeddings = 1024  # room for long streams in the disconnect/shutdown tests
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "base"))
    experts = {
        "alpha": make_expert(base, root / "alpha", r=4, alpha=8, targets=LLAMA_TARGETS, seed=1),
        "beta": make_expert(base, root / "beta", r=2, alpha=3, targets=LLAMA_TARGETS[:2], seed=2, rslora=True),
        "gamma": make_expert(base, root / "gamma", r=8, alpha=4, targets=LLAMA_TARGETS[-2:], seed=3),
    }
    base = AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()  # records its path for reloading
    model = XLoraModel(base, XLoraConfig(experts={k: str(v) for k, v in experts.items()}, head_hidden_size=16))
    randomize_head(model, 0, 0.7)
    model.save_pretrained(root / "xlora")
    _BUILT["dir"] = root / "xlora"
    return _BUILT["dir"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def ref(model_dir):
    """A separate copy of the model for the expected outputs (a server's or batcher's copy belongs to its worker)."""
    return load_model_and_tokenizer(model_dir)


def at_once(calls: list[Callable[[], Any]], timeout_s: float) -> list[Any]:
    """Run each call on a thread of its own, all released together by a barrier (concurrent clients);
    their results in order. Fails with every error any of them raised."""
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors
    assert len(results) == len(calls), f"{len(calls) - len(results)} of the calls still running after {timeout_s} s"
    return [results[i] for i in range(len(calls))]


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll ``url/health`` until it answers 200; fail with the server's stderr if it exits, or after ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.communicate()[1][-4000:]}")
        assert time.monotonic() < deadline, f"the server did not answer /health within {timeout_s:g} s"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def long_context_base(model_dir: Path, dest: Path, context: int = 1 << 15) -> Path:
    """A copy of ``model_dir``'s base with a ``context``-token window (rotary positions: no weight changes),
    for streams that outlast a shutdown timeout; pass it as ``--base``."""
    import json
    import shutil

    shutil.copytree(model_dir.parent / "base", dest)
    config = json.loads((dest / "config.json").read_text())
    config["max_position_embeddings"] = context
    (dest / "config.json").write_text(json.dumps(config))
    return dest
