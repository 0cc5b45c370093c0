"""Hugging Face's ``Trainer`` on an XLoraModel over a base with TIED embeddings (as SmolLM2's): its checkpoints
and ``save_model()`` write the X-LoRA (config and head, never the frozen base), they reload with
``XLoraModel.from_pretrained`` to the trained model's logits, and ``resume_from_checkpoint`` continues the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_TARGETS, VOCAB, make_expert, tokens
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from xlora import XLoraConfig, XLoraModel

pytestmark = pytest.mark.usefixtures("one_thread")
XLORA_FILES = {"xlora_config.json", "xlora_head.safetensors", "model.safetensors"}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Llama whose LM head is its input embedding, saved, with two PEFT experts."""
    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(root / "base")
    experts = {name: str(make_expert(base, root / name, r=4, alpha=8, targets=LLAMA_TARGETS, seed=seed))
               for name, seed in (("a", 1), ("b", 2))}
    return root, experts


def build(tied) -> XLoraModel:
    root, experts = tied
    model = XLoraModel(LlamaForCausalLM.from_pretrained(root / "base"), XLoraConfig(experts=experts, head_dropout=0.0))
    assert model.base_model.lm_head.weight is model.base_model.model.embed_tokens.weight
    return model


def trainer(model, out, max_steps=3) -> Trainer:
    data = [{"input_ids": row, "labels": row} for row in tokens(batch=12, seq=10, seed=3)]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, save_steps=1,
                             learning_rate=5e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                             seed=5)
    return Trainer(model=model, args=args, train_dataset=data)


def test_checkpoints_and_save_model_write_the_xlora_and_reload_to_equal_logits(tied, tmp_path):
    model = build(tied)
    x = tokens(batch=2, seq=9, seed=8)
    before = model(x).logits.detach()
    trainer(model, tmp_path / "run").train()
    model.eval()
    after = model(x).logits.detach()
    assert (after - before).abs().max() > 1e-3  # three steps moved the head
    trainer_obj = trainer(model, tmp_path / "run")
    trainer_obj.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-3", tmp_path / "final"):
        assert XLORA_FILES <= {p.name for p in folder.iterdir()}
        weights = load_file(str(folder / "model.safetensors"))
        assert set(weights) == {f"head.{k}" for k in model.head.state_dict()}  # the trainable head, no base
        assert json.loads((folder / "xlora_config.json").read_text())["experts"] == tied[1]
        back = XLoraModel.from_pretrained(folder, base_model=LlamaForCausalLM.from_pretrained(tied[0] / "base")).eval()
        torch.testing.assert_close(back(x).logits, after, rtol=0, atol=1e-6)
    first = XLoraModel.from_pretrained(tmp_path / "run" / "checkpoint-1", base_model=str(tied[0] / "base")).eval()
    assert (first(x).logits - after).abs().max() > 1e-4  # each checkpoint holds its own step's head


def test_resume_from_checkpoint_continues_the_run(tied, tmp_path):
    straight = build(tied)
    trainer(straight, tmp_path / "a").train()
    resumed = build(tied)
    with torch.no_grad():
        for p in resumed.head.parameters():
            p.add_(1.0)  # not the checkpoint's head: the resume must load it
    t = trainer(resumed, tmp_path / "b")
    out = t.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert out.global_step == 3  # steps 1-2 come from the checkpoint (its log too), step 3 is trained here
    assert [r["step"] for r in t.state.log_history if "loss" in r] == [1, 2, 3]
    for (name, want), got in zip(straight.head.state_dict().items(), resumed.head.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
