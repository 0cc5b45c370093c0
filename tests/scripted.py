"""A causal LM whose greedy output is set by construction, not by training: tests that need a model to answer
with given text get it on every CPU (an overfitted tiny model's greedy strings change with the instruction set).

GPT-2 with its blocks' output projections zeroed and token embeddings zeroed keeps only the position embedding in
the residual stream, ``h_p = c·e_p`` (one-hot, ``c`` large). After the final LayerNorm, ``ln(e_p)`` is about
``√n`` at ``p`` and ``-1/√n`` elsewhere, so an LM head row ``W[v, p] = m/√n`` for the token wanted at position
``p`` gives that token a logit of about ``m`` and every other token about ``0`` (minus ``m·k/n``). LoRA experts
add to the residual stream through the zeroed projections, but ``c`` dwarfs what they add, and the final
LayerNorm is scale-free: the margin ``m`` survives any mixture.

Positions follow the attention mask (transformers computes ``position_ids`` as its cumulative sum), so the same
script holds in a left-padded batch.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SCALE = 1000.0  # c: the position signal, far above what a LoRA expert adds to the residual stream
MARGIN = 40.0  # m: the scripted token's logit over every other token's


def scripted_model(script: dict[int, int], vocab_size: int, n_positions: int, *, n_head: int = 4,
                   pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> GPT2LMHeadModel:
    """A GPT-2 that predicts ``script[p]`` as the next token at position ``p`` (0-based) by a logit margin of
    about ``MARGIN``; positions not in the script have near-equal logits (the model's answer there is arbitrary).

    Args:
        script: position -> token id to produce there (the token after position ``p`` is ``script[p]``).
        vocab_size: the tokenizer's vocabulary size.
        n_positions: the longest sequence; also the width (one-hot positions), rounded up to ``n_head``.
    """
    if script and max(script) >= n_positions:
        raise ValueError(f"script reaches position {max(script)} but n_positions={n_positions}: raise n_positions")
    width = -(-n_positions // n_head) * n_head
    config = GPT2Config(n_embd=width, n_layer=1, n_head=n_head, vocab_size=vocab_size, n_positions=width,
                        tie_word_embeddings=False, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                        eos_token_id=eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(SCALE * torch.eye(width))
        for block in model.transformer.h:  # the blocks read the residual stream but write nothing to it
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        head = torch.zeros(vocab_size, width)
        for position, token in script.items():
            head[token, position] = MARGIN / width ** 0.5
        model.lm_head.weight.copy_(head)
    return model.eval()


def script_answers(prompts: list[list[int]], answers: list[list[int]]) -> dict[int, int]:
    """The script that answers each prompt (token ids) with its answer (token ids, end of turn included).

    Raises:
        ValueError: two prompts' answers need different tokens at the same position (make the prompts' lengths
            differ by more than the answers' lengths).
    """
    script: dict[int, int] = {}
    for prompt, answer in zip(prompts, answers):
        for i, token in enumerate(answer):
            position = len(prompt) - 1 + i  # the logits at the prompt's last token produce answer[0]
            if script.setdefault(position, token) != token:
                raise ValueError(f"two answers need different tokens after position {position}: make the prompts' "
                                 "lengths differ by more than the answers' lengths")
    return script
