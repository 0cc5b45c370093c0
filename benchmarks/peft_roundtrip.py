"""How close PEFT's X-LoRA comes to ours on the shipped demo (SmolLM2-135M, five experts, 180 adapted modules).

The demo's X-LoRA (``src/xlora/demo/assets``) is converted with ``xlora convert --to peft`` (experts
copied in, recorded relative to the folder), the folder is moved, and PEFT's ``XLoraModel`` loads it
(``PeftModel.from_pretrained(base, DIR, config=peft_config(DIR))``). Both run the same chat prompts
(one per domain) in float32; printed: the largest absolute logit difference, the largest logit, and
whether the greedy next tokens agree. The converted folder read back by us is checked the same way.

    .venv/bin/python benchmarks/peft_roundtrip.py       # ~1 min on 2 cores

Needs the demo's base model (``xlora demo`` converts it once) and ``pip install -e '.[demo]'`` (peft).
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from xlora import XLoraModel
from xlora.demo.base_model import base_model_dir
from xlora.formats.peft_xlora import peft_config
from xlora.pretrained import convert

ASSETS = Path(__file__).resolve().parents[1] / "src" / "xlora" / "demo" / "assets"
PROMPTS = ["Give the isoelectric point of MKTAYIAK.", "What is the molar mass of ethanol (CCO)?",
           "What is 17 times 23?", "What is the capital of France?",
           "List the triples in: spider silk is made of protein."]


def main() -> None:
    torch.manual_seed(0)
    base_dir = base_model_dir()
    tok = AutoTokenizer.from_pretrained(str(base_dir))

    def base():
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        model.config.use_cache = False  # PEFT's XLoraModel refuses use_cache=True
        return model

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    ours = XLoraModel.from_pretrained(ASSETS, base_model=base()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        convert(ASSETS, Path(tmp) / "peft", base_model=base(), to="peft")
        moved = Path(shutil.move(Path(tmp) / "peft", Path(tmp) / "moved"))
        theirs = PeftModel.from_pretrained(base(), str(moved), config=peft_config(moved)).eval()
        back = XLoraModel.from_pretrained(moved, base_model=base()).eval()
        with torch.inference_mode():
            ref = ours(**batch).logits
            rows = {"PEFT XLoraModel (moved export)": theirs(**batch).logits, "ours (moved export)": back(**batch).logits}
    mask = batch["attention_mask"].bool()
    print(f"demo X-LoRA, {len(PROMPTS)} chat prompts, {int(mask.sum())} tokens, float32, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"largest |logit| of ours: {ref[mask].abs().max().item():.2f}")
    for name, got in rows.items():
        diff = (got - ref)[mask].abs().max().item()
        same = bool((got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all())
        print(f"{name}: max abs logit difference {diff:.3g}; greedy next tokens equal: {same}")


if __name__ == "__main__":
    main()
