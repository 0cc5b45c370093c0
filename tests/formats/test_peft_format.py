"""PEFT's X-LoRA format: our export loads in PEFT whole; PEFT's own saves load here, or are refused
clearly when PEFT wrote half a head or the experts are gone."""

from __future__ import annotations

import json
import re
import shutil

import peft
import pytest
import torch
from conftest import tokens
from formats_fixtures import build
from packaging.version import Version
from peft import PeftModel
from safetensors.torch import load_file, save_file

from xlora import XLoraModel
from xlora.formats import detect
from xlora.formats.peft_xlora import peft_config, save_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def peft_base(setup):
    base = setup.base()
    base.config.use_cache = False  # PEFT's XLoraModel refuses use_cache=True
    return base


EXPORTS = [
    dict(head_depth=1),
    dict(head_depth=2, layerwise_scalings=True, head_dropout=0.1, scaling_pass_value=0.5),
    dict(head_depth=3, head_dropout=0.0, top_k=2, enable_softmax_topk=True, softmax_temperature=0.6,
         global_scaling_weight=1.4, head_bias=False),
]


@pytest.mark.parametrize("cfg", EXPORTS, ids=["d1", "d2-layerwise-spv", "d3-topk-nobias"])
def test_export_loads_in_peft_with_our_logits_from_any_directory(llama, tmp_path, monkeypatch, cfg):
    ours = build(llama, **cfg)
    x = tokens(batch=2, seq=8, seed=2)
    ref = ours(x).logits
    ours.save_pretrained(tmp_path / "peft", format="peft")
    files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "xlora_names.json"]
    recorded = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["adapters"]
    assert list(recorded) == ["0", "1", "2"] and all(v.startswith("/") for v in recorded.values())
    monkeypatch.chdir(tmp_path.parent)  # PEFT resolves relative paths against the working directory
    theirs = PeftModel.from_pretrained(peft_base(llama), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(theirs(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    assert (ref - ours(x, scalings="zero").logits).abs().max() > 1e-3
    # and back: our names, our head (biases and all), equal logits
    assert detect(tmp_path / "peft") == "peft"
    back = XLoraModel.from_pretrained(tmp_path / "peft", base_model=llama.base()).eval()
    assert back.xlora_config.to_dict() == ours.xlora_config.to_dict() | {"experts": back.xlora_config.experts}
    torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=1e-6)


def test_converted_peft_export_survives_a_move(llama, tmp_path, monkeypatch):
    """`xlora convert SRC DST --to peft` copies the experts in and records them relative to DST: after moving
    DST, PEFT loads it from inside (it resolves against the working directory) and, with peft_config, from
    anywhere; ours from anywhere. Absolute paths (as before) named the folder it was written in."""
    from xlora.cli import main

    ours = build(llama, head_depth=2, layerwise_scalings=True)
    x = tokens(batch=2, seq=8, seed=4)
    ref = ours(x).logits
    ours.save_pretrained(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    recorded = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["adapters"]
    assert recorded == {"0": "0", "1": "1", "2": "2"}
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(tmp_path / "peft", tmp_path / "elsewhere" / "moved")
    monkeypatch.chdir(moved)
    inside = PeftModel.from_pretrained(peft_base(llama), ".").eval()
    torch.testing.assert_close(inside(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    monkeypatch.chdir(tmp_path)
    anywhere = PeftModel.from_pretrained(peft_base(llama), str(moved), config=peft_config(moved)).eval()
    torch.testing.assert_close(anywhere(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    back = XLoraModel.from_pretrained(moved, base_model=llama.base()).eval()
    assert back.xlora_config.expert_names == ["alpha", "beta", "gamma"]
    torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=1e-6)


def peft_xlora(setup, depth: int, seed: int = 11):
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, xlora_depth=depth, xlora_size=16,
                           adapters={str(i): str(p) for i, p in enumerate(setup.expert_dirs.values())},
                           layerwise_scalings=True, softmax_temperature=0.8)
    model = peft.get_peft_model(peft_base(setup), cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.normal_(0, 0.5)
    return model


PEFT_DROPS_HEAD_LAYERS = Version(peft.__version__) < Version("0.22")  # its save filtered layers.<i> as adapters


def as_peft_021_saved(path) -> None:
    """Rewrite PEFT's X-LoRA weights file as peft <= 0.21's ``save_pretrained`` wrote it: without every classifier
    layer ``layers.<i>`` whose ``i`` is an expert's name ("0".."N-1"), which it filtered out as other adapters."""
    names = json.loads((path / "adapter_config.json").read_text())["adapters"]
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.split("classifier.layers.")[-1].split(".")[0] not in names},
              str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("depth", [1, 2])
def test_peft_own_save_loads_and_a_partial_one_is_refused_then_repaired_by_save_classifier(llama, tmp_path, depth):
    """peft >= 0.22 saves the whole head, which loads with PEFT's logits; peft <= 0.21 dropped layers.<i> for every
    expert index i (layers.0 always), so its save of any head was partial: refused, then repaired."""
    theirs = peft_xlora(llama, depth=depth)
    x = tokens(batch=2, seq=8, seed=5)
    ref = theirs(input_ids=x).logits
    theirs.save_pretrained(str(tmp_path / "saved"))
    held = sorted({k.split("classifier.")[-1].rsplit(".", 1)[0]
                   for k in load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))})
    kept = [] if depth == 1 else ["layers.3"]  # layers.0 (and layers.3 had there been 4 experts) dropped
    if PEFT_DROPS_HEAD_LAYERS:
        assert held == kept
    else:
        assert held == ["layers.0", "layers.3"][:depth]  # the whole head (Linear, ReLU, Dropout, Linear)
        whole = XLoraModel.from_pretrained(tmp_path / "saved", base_model=llama.base()).eval()
        torch.testing.assert_close(whole(x).logits, ref, rtol=0, atol=1e-5)
        as_peft_021_saved(tmp_path / "saved")
    with pytest.raises(ValueError, match=re.escape(f"holds {depth - 1} of the classifier's {depth} linear layers ({kept})")):
        XLoraModel.from_pretrained(tmp_path / "saved", base_model=llama.base())
    save_classifier(theirs, tmp_path / "saved")
    ours = XLoraModel.from_pretrained(tmp_path / "saved", base_model=llama.base()).eval()
    assert ours.xlora_config.expert_names == ["0", "1", "2"] and ours.xlora_config.layerwise_scalings
    torch.testing.assert_close(ours(x).logits, ref, rtol=0, atol=1e-5)
    assert (ref - ours(x, scalings="uniform").logits).abs().max() > 1e-4  # the head matters
    with pytest.raises(ValueError, match="is not a PEFT X-LoRA model"):
        save_classifier(llama.base(), tmp_path / "saved")


def test_gone_experts_are_named_and_peft_partial_subfolders_never_read(llama, tmp_path):
    moved = {n: shutil.copytree(p, tmp_path / "experts" / n) for n, p in llama.expert_dirs.items()}
    theirs = peft_xlora(llama, depth=1)
    theirs.peft_config["default"].adapters = {str(i): str(p) for i, p in enumerate(moved.values())}
    theirs.save_pretrained(str(tmp_path / "saved"))
    save_classifier(theirs, tmp_path / "saved")
    assert (tmp_path / "saved" / "0" / "adapter_model.safetensors").is_file()  # PEFT's partial copies
    shutil.rmtree(tmp_path / "experts" / "alpha")
    shutil.rmtree(tmp_path / "experts" / "gamma")
    with pytest.raises(FileNotFoundError, match=r"experts '0' \(.*alpha\), '2' \(.*gamma\) recorded in .* are gone"):
        XLoraModel.from_pretrained(tmp_path / "saved", base_model=llama.base())


def test_models_the_formats_cannot_hold_are_refused(llama, tmp_path):
    ours = build(llama, head_depth=2, head_relu_dropout=False)
    with pytest.raises(ValueError, match="PEFT's X-LoRA head always puts ReLU between its layers"):
        ours.save_pretrained(tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match=r"format='nope' is not one of"):
        ours.save_pretrained(tmp_path / "x", format="nope")
    short = build(llama, scaling_pass_layers=1)  # a head trained on a shortened scaling pass: ours only
    for fmt, who in (("peft", "PEFT"), ("original", "the original xlora package"), ("mistralrs", "mistral.rs")):
        with pytest.raises(ValueError, match=f"{who}'s X-LoRA runs every decoder layer.*scaling_pass_layers=1 \\(of 2\\)"):
            short.save_pretrained(tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()


def test_trained_experts_are_written_in_every_format(llama, tmp_path):
    """With use_trainable_adapters the experts' weights changed: the exports carry the trained ones."""
    ours = build(llama, use_trainable_adapters=True)
    with torch.no_grad():
        for layer in ours.mixture_layers():
            layer.lora_B.add_(0.05)
    x = tokens()
    ref = ours(x).logits
    ours.save_pretrained(tmp_path / "peft", format="peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir())[:3] == ["0", "1", "2"]  # trained copies, bundled
    theirs = PeftModel.from_pretrained(peft_base(llama), str(tmp_path / "peft"), config=peft_config(tmp_path / "peft"))
    torch.testing.assert_close(theirs.eval()(input_ids=x).logits, ref, rtol=0, atol=1e-5)
    ours.save_pretrained(tmp_path / "orig", format="original")
    back = XLoraModel.from_pretrained(tmp_path / "orig", base_model=llama.base()).eval()
    assert back.xlora_config.use_trainable_adapters
    torch.testing.assert_close(back(x).logits, ref, rtol=0, atol=1e-6)
    untrained = build(llama)
    assert (untrained(x).logits - ref).abs().max() > 1e-3  # the training is what the exports kept
