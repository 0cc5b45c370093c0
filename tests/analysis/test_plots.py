"""Plots: PNG sizes, labels and pagination."""

from __future__ import annotations

import struct

import pytest
import torch
from conftest import tiny_tokenizer

from xlora.analysis.plots import display_token, generation_share_plot, layer_expert_heatmap, token_expert_heatmap

NAMES = ["alpha", "beta", "gamma"]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_token_heatmap_png_size_and_row_labels(tmp_path):
    tok = tiny_tokenizer()
    ids = tok("Hi yo")["input_ids"]
    decoded = [tok.decode([i]) for i in ids]
    assert decoded == ["H", "i", " ", "y", "o"]
    s = torch.rand(5, 2, 3)
    (page,) = token_expert_heatmap(s, decoded, NAMES, tmp_path)
    assert page.png == tmp_path / "tokens-p01.png" and page.svg.read_text().lstrip().startswith("<?xml")
    # width: labels 80 + 3 experts x 60 + colour bar 100; height: 50 + 5 rows x 20 + 90
    assert png_size(page.png) == page.size_px == (360, 240)
    assert page.y_labels == ["H", "i", "\u2423", "y", "o"] == [display_token(t) for t in decoded]
    assert page.x_labels == NAMES


def test_200_tokens_are_paginated_at_64_rows(tmp_path):
    tokens = [f"t{i}" for i in range(200)]
    pages = token_expert_heatmap(torch.rand(200, 2, 3), tokens, NAMES, tmp_path)
    assert [len(p.y_labels) for p in pages] == [64, 64, 64, 8]
    assert sum((p.y_labels for p in pages), []) == tokens
    assert [png_size(p.png)[1] for p in pages] == [50 + 64 * 20 + 90] * 3 + [50 + 8 * 20 + 90]
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"tokens-p0{i}.{x}" for i in range(1, 5) for x in ("png", "svg")]
    shares = generation_share_plot(torch.rand(40, 2, 3), tokens[:40], NAMES, tmp_path, per_page=32)
    assert [p.x_labels for p in shares] == [tokens[:32], tokens[32:40]]
    # width: axis 70 + 32 tokens x 16 + legend 170 (a short last page keeps a 12-token minimum width)
    assert [png_size(p.png) for p in shares] == [(70 + 32 * 16 + 170, 460), (70 + 12 * 16 + 170, 460)]
    assert shares[0].legend == NAMES


def test_layer_heatmap_has_one_row_per_decoder_layer(tmp_path):
    layers = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    s = torch.rand(7, 6, 3)
    (page,) = layer_expert_heatmap(s, layers, NAMES, tmp_path)
    assert page.y_labels == ["layer 0", "layer 1", "layer 2"]
    assert page.axis_label == "decoder layer (mean over its 2 adapted modules)"
    torch.testing.assert_close(torch.tensor(page.values), s.mean(0).reshape(3, 2, 3).mean(1))
    assert png_size(page.png)[1] == 50 + 3 * 20 + 90
    with pytest.raises(ValueError, match=r"do not fit \[T, L=6, E=3\]"):
        layer_expert_heatmap(torch.rand(7, 5, 3), layers, NAMES, tmp_path)
