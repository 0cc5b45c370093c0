"""The original ``xlora`` package's format: both layouts read, written, converted; clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tokens
from formats_fixtures import build, copy_head
from safetensors.torch import load_file, save_file
from torch import nn

from xlora import XLoraModel
from xlora.cli import main
from xlora.formats import detect

pytestmark = pytest.mark.usefixtures("one_thread")


class OriginalClassifier(nn.Module):
    """The parameter layout of the package's ``xLoRAClassifier``: ``inner`` (a ModuleList that
    also holds ReLU and Dropout when ``enable_relu_and_dropout``) and ``last``."""

    def __init__(self, depth: int, hidden: int, size: int, out: int, relu_dropout: bool, bias: bool) -> None:
        super().__init__()
        self.inner = nn.ModuleList()
        width = hidden
        for _ in range(depth - 1):
            self.inner.append(nn.Linear(width, size, bias=bias))
            width = size
            if relu_dropout:
                self.inner.extend([nn.ReLU(), nn.Dropout(0.2)])
        self.last = nn.Linear(width, out, bias=bias)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        mods = [m for m in self.inner if isinstance(m, nn.Linear)] + [self.last]
        return [(m.weight, m.bias) for m in mods]


def original_config(**overrides) -> dict:
    """Every key of the package's xLoRAConfig as its save_pretrained writes it (``device`` dropped)."""
    cfg = {"hidden_size": 32, "base_model_id": None, "adapters": {}, "enable_softmax": True,
           "enable_softmax_topk": False, "layerwise_scalings": False, "xlora_depth": 1, "xlora_size": 2048,
           "enable_relu_and_dropout": False, "use_bias": True, "xlora_dropout_p": 0.2, "use_trainable_adapters": False,
           "softmax_temperature": 1.0, "top_k_lora": None, "scaling_pass_value": 0.0, "global_scaling_weight": 1.0}
    return cfg | overrides


def write(directory, cfg: dict, classifier: nn.Module | dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "xlora_config.json").write_text(json.dumps(cfg))
    state = classifier if isinstance(classifier, dict) else classifier.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "xlora_classifier.safetensors"))


def test_early_layout_loads_with_the_logits_of_the_same_model_built_directly(llama, tmp_path):
    ours = build(llama, head_depth=3, head_relu_dropout=True, head_dropout=0.2, layerwise_scalings=True,
                 softmax_temperature=0.7, global_scaling_weight=1.3)
    L, E = ours.num_layers, ours.num_experts
    clf = OriginalClassifier(3, 32, 16, L * E, relu_dropout=True, bias=True)
    assert {k for k in clf.state_dict() if k.endswith("weight")} == {"inner.0.weight", "inner.3.weight", "last.weight"}
    cfg = original_config(base_model_id=str(llama.base_dir), adapters={n: str(p) for n, p in llama.expert_dirs.items()},
                          layerwise_scalings=True, xlora_depth=3, xlora_size=16, enable_relu_and_dropout=True,
                          softmax_temperature=0.7, global_scaling_weight=1.3)
    write(tmp_path / "orig", cfg, clf)
    assert detect(tmp_path / "orig") == "original"
    loaded = XLoraModel.from_pretrained(tmp_path / "orig").eval()  # the base from base_model_id
    copy_head(ours, clf.pairs())
    x = tokens(batch=2, seq=9)
    ref = ours(x)
    out = loaded(x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.scalings, ref.scalings, rtol=0, atol=1e-6)
    assert (ref.logits - ours(x, scalings="zero").logits).abs().max() > 1e-3  # the experts do something
    want = ours.xlora_config.to_dict() | {"experts": loaded.xlora_config.experts}
    assert loaded.xlora_config.to_dict() == want
    assert loaded.xlora_config.experts == {n: str(p.resolve()) for n, p in llama.expert_dirs.items()}


def test_later_layout_reads_the_saved_subfolders_and_drops_the_classifier_keys_in_them(llama, tmp_path):
    """adapters as a list; each expert under <dir>/<name>/ as the package's PEFT save wrote it, with the
    classifier's biases in every expert file; the paper's config carries stop_token_id too."""
    names = {"adapter_1": "alpha", "adapter_2": "beta", "adapter_3": "gamma"}
    src = tmp_path / "paper"
    for new, old in names.items():
        (src / new).mkdir(parents=True)
        shutil.copy(llama.expert_dirs[old] / "adapter_config.json", src / new)
        state = load_file(str(llama.expert_dirs[old] / "adapter_model.safetensors"))
        state |= {"internal_xlora_classifier.inner.0.bias": torch.zeros(16), "internal_xlora_classifier.last.bias": torch.zeros(3)}
        save_file(state, str(src / new / "adapter_model.safetensors"))
    clf = OriginalClassifier(2, 32, 16, 3, relu_dropout=False, bias=False)
    cfg = original_config(adapters=list(names), xlora_depth=2, xlora_size=16, use_bias=False, stop_token_id=2,
                          use_mean_pool=False, base_model_id="some-org/zephyr-that-is-not-here")
    write(src, cfg, clf)
    with pytest.warns(UserWarning, match="cleaned into a temporary folder"):
        loaded = XLoraModel.from_pretrained(src, base_model=llama.base()).eval()
    assert loaded.xlora_config.expert_names == list(names)
    assert not loaded.xlora_config.head_bias and not loaded.xlora_config.head_relu_dropout
    from xlora import XLoraConfig

    direct = XLoraModel(llama.base(), XLoraConfig(
        experts={new: str(llama.expert_dirs[old]) for new, old in names.items()}, head_depth=2, head_hidden_size=16,
        head_bias=False, head_relu_dropout=False)).eval()
    copy_head(direct, clf.pairs())
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, direct(x).logits, rtol=0, atol=1e-5)
    # the source files are left as they were
    assert "internal_xlora_classifier.last.bias" in load_file(str(src / "adapter_1" / "adapter_model.safetensors"))


def test_round_trip_ours_original_ours_and_convert_back(llama, tmp_path, capsys):
    ours = build(llama, head_depth=3, head_dropout=0.1, layerwise_scalings=True, top_k=2, enable_softmax_topk=True)
    x = tokens()
    ref = ours(x).logits
    ours.save_pretrained(tmp_path / "orig", format="original")
    out = tmp_path / "orig"
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "gamma", "xlora_classifier.safetensors",
                                                    "xlora_config.json"]
    assert set(load_file(str(out / "xlora_classifier.safetensors"))) == {
        "inner.0.weight", "inner.0.bias", "inner.3.weight", "inner.3.bias", "last.weight", "last.bias"}
    cfg = json.loads((out / "xlora_config.json").read_text())
    assert cfg["adapters"] == ["alpha", "beta", "gamma"] and cfg["xlora_depth"] == 3 and cfg["top_k_lora"] == 2
    for name, path in llama.expert_dirs.items():
        assert (out / name / "adapter_model.safetensors").read_bytes() == (path / "adapter_model.safetensors").read_bytes()
    back = XLoraModel.from_pretrained(out, base_model=llama.base()).eval()
    assert torch.equal(back(x).logits, ref)
    assert back.xlora_config.to_dict() == ours.xlora_config.to_dict() | {"experts": back.xlora_config.experts}
    # `xlora convert` writes ours, bundled: it stands alone once the original folder is gone
    assert main(["convert", str(out), str(tmp_path / "ours"), "--base", str(llama.base_dir)]) == 0
    assert "(original format)" in capsys.readouterr().out
    shutil.rmtree(out)
    assert detect(tmp_path / "ours") == "ours" and (tmp_path / "ours" / "experts" / "beta").is_dir()
    again = XLoraModel.from_pretrained(tmp_path / "ours", base_model=llama.base()).eval()
    assert torch.equal(again(x).logits, ref)


def test_refusals_name_the_file_the_value_and_the_fix(llama, tmp_path):
    experts = {n: str(p) for n, p in llama.expert_dirs.items()}
    # a classifier trained for another base model (hidden size 48): the shapes do not fit
    write(tmp_path / "shape", original_config(adapters=experts, xlora_depth=2, xlora_size=16),
          OriginalClassifier(2, 48, 16, 3, relu_dropout=False, bias=True))
    with pytest.raises(ValueError, match=r"layer 'inner.0' has weight \(16, 48\).*needs weight \(16, 32\)"):
        XLoraModel.from_pretrained(tmp_path / "shape", base_model=llama.base())
    # a classifier missing a layer
    clf = OriginalClassifier(2, 32, 16, 3, relu_dropout=False, bias=True).state_dict()
    write(tmp_path / "part", original_config(adapters=experts, xlora_depth=2, xlora_size=16),
          {k: v for k, v in clf.items() if k.startswith("last")})
    with pytest.raises(ValueError, match=r"holds 1 linear layer\(s\) \(\['last'\]\) but the head .* has 2"):
        XLoraModel.from_pretrained(tmp_path / "part", base_model=llama.base())
    # experts neither saved in sub-folders nor at a recorded path
    write(tmp_path / "gone", original_config(adapters=["math", "bio"]), OriginalClassifier(1, 32, 16, 2, False, True))
    with pytest.raises(FileNotFoundError, match=r"experts 'math', 'bio' of .* are not there"):
        XLoraModel.from_pretrained(tmp_path / "gone", base_model=llama.base())
    # the early sequence-level classifier and keys we do not know are refused, not guessed at
    write(tmp_path / "pool", original_config(adapters=experts, use_mean_pool=True), OriginalClassifier(1, 32, 16, 3, False, True))
    with pytest.raises(ValueError, match="use_mean_pool=true"):
        XLoraModel.from_pretrained(tmp_path / "pool", base_model=llama.base())
    write(tmp_path / "odd", original_config(adapters=experts, mystery=1), OriginalClassifier(1, 32, 16, 3, False, True))
    with pytest.raises(ValueError, match=r"unknown keys \['mystery'\]"):
        XLoraModel.from_pretrained(tmp_path / "odd", base_model=llama.base())
    # a pickle classifier is never unpickled
    (tmp_path / "odd" / "xlora_classifier.safetensors").rename(tmp_path / "odd" / "xlora_classifier.pt")
    (tmp_path / "odd" / "xlora_config.json").write_text(json.dumps(original_config(adapters=experts)))
    with pytest.raises(FileNotFoundError, match="only xlora_classifier.pt, a pickle, is there"):
        XLoraModel.from_pretrained(tmp_path / "odd", base_model=llama.base())
