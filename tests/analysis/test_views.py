"""One token convention and one module convention in every view, checked on hand-set scalings."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import tiny_tokenizer

from xlora.analysis.views import (
    GENERATED_AXIS,
    TOKEN_AXIS,
    decoder_layer,
    generated,
    module_rows,
    one_mixture,
    written_by,
)

NAMES = ["alpha", "beta", "gamma"]
PROMPT, ANSWER = "Hi yo", "CAT"


def hand_rows(T: int, L: int = 2) -> torch.Tensor:
    """``[T, L, E=3]``: row ``t`` gives expert ``t % 3`` the layer-averaged weight ``0.5 + 0.04 t`` (the rest
    split evenly), so every row has its own dominant weight and the attribution can be read off exactly."""
    rows = torch.zeros(T, L, 3)
    for t in range(T):
        w = 0.5 + 0.04 * t
        rows[t] = (1 - w) / 2
        rows[t, 0, t % 3] = w + 0.1  # the layers differ; their mean is w
        rows[t, 1, t % 3] = w - 0.1
        rows[t, 0, (t + 1) % 3] -= 0.1
        rows[t, 1, (t + 1) % 3] += 0.1
    return rows


def test_written_by_gives_row_t_to_token_t_plus_1():
    rows = hand_rows(4)
    w = written_by([10, 11, 12, 13, 14], rows)  # 5 tokens, 4 read (the last was generated, never read)
    assert w.ids == [11, 12, 13, 14] and torch.equal(w.scalings, rows)
    assert w.dominant(NAMES) == [("alpha", pytest.approx(0.5)), ("beta", pytest.approx(0.54)),
                                 ("gamma", pytest.approx(0.58)), ("alpha", pytest.approx(0.62))]
    w = written_by([10, 11, 12, 13], rows)  # a prompt alone: its last row wrote nothing yet
    assert w.ids == [11, 12, 13] and torch.equal(w.scalings, rows[:3])
    g = generated([12, 13], rows[1:3])  # tokens 12 and 13 were written by rows 1 and 2
    assert g.ids == [12, 13] and g.dominant(NAMES) == w.dominant(NAMES)[1:]
    with pytest.raises(ValueError, match=r"rows \(4, 2, 3\) must be \[T, L, E\] with T <= 3 tokens"):
        written_by([1, 2, 3], rows)
    with pytest.raises(ValueError, match=r"step scalings \(4, 2, 3\) must be \[n=2, L, E\]"):
        generated([1, 2], rows)


def hand_inspection(tok):
    """An :class:`Inspection` as ``inspect_prompt(..., generate=3)`` builds it, from hand-set scalings: the
    prompt read in one call, then one call per generated token but the last."""
    from xlora.analysis import ScalingsLog, expert_stats, mixture_summary
    from xlora.analysis.inspect import Inspection

    prompt, new = tok(PROMPT)["input_ids"], tok(ANSWER)["input_ids"]
    rows = hand_rows(len(prompt) + len(new) - 1)  # [7, 2, 3]
    log = ScalingsLog(NAMES, ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"], {"prompt": PROMPT})
    seq = torch.tensor([prompt + new])
    log.record(rows[None, : len(prompt)], seq[:, : len(prompt)])
    for k in range(len(new) - 1):
        log.record(rows[None, len(prompt) + k: len(prompt) + k + 1], seq[:, len(prompt) + k: len(prompt) + k + 1])
    _, read = log.sequence(0)
    assert torch.equal(read, rows)
    return Inspection(log, prompt, new, ANSWER, read, expert_stats(read, NAMES, log.layer_names),
                      mixture_summary(read)), rows


def test_every_view_shows_a_token_with_the_row_that_wrote_it(tmp_path):
    pytest.importorskip("matplotlib")
    from xlora.analysis.inspect import print_inspection, write_outputs
    from xlora.analysis.plots import display_token, token_expert_heatmap
    from xlora.demo.dialogue import _summary
    from xlora.demo.graph import line_experts

    tok = tiny_tokenizer()
    result, rows = hand_inspection(tok)
    mix = rows.mean(1)  # [7, 3]
    text = PROMPT + ANSWER
    # the truth, by hand: token k of "Hi yoCAT" (k >= 1) was written by row k - 1
    truth = {k: (text[k], NAMES[(k - 1) % 3], 0.5 + 0.04 * (k - 1)) for k in range(1, len(text))}

    buf = io.StringIO()
    print_inspection(result, tok, buf, color=False)
    printed = buf.getvalue().splitlines()
    assert "colours: the expert that wrote each token (the mixture at the position before it)" in printed
    marked = "".join(line.split(": ", 1)[1] for line in printed if line.startswith(("prompt: ", "answer: ")))
    # runs merge only equal neighbours; here every token has a new expert
    assert marked == "[-]H" + "".join(f"[{truth[k][1]}]{truth[k][0]}" for k in range(1, len(text)))

    write_outputs(result, tok, tmp_path / "inspect")
    stats = json.loads((tmp_path / "inspect" / "stats.json").read_text())
    assert stats["token_convention"] == TOKEN_AXIS
    assert [[p, e, round(w, 4)] for p, e, w in stats["token_experts"]] == \
        [[c, e, round(w, 4)] for c, e, w in truth.values()]

    pages = token_expert_heatmap(result.written.scalings, result.written.pieces(tok), NAMES, tmp_path, "tok")
    (page,) = pages
    assert page.axis_label == TOKEN_AXIS
    assert page.y_labels == [display_token(c) for c, _, _ in truth.values()]
    torch.testing.assert_close(torch.tensor(page.values), mix)

    from xlora.analysis.plots import generation_share_plot

    answer = result.answer
    (share,) = generation_share_plot(answer.scalings, answer.pieces(tok), NAMES, tmp_path)
    assert share.x_labels == list(ANSWER) and share.axis_label == GENERATED_AXIS
    torch.testing.assert_close(torch.tensor(share.values), mix[len(PROMPT) - 1:])
    # the same rows through a StepRecorder (xlora generate --show-experts, the demo, dialogue, graph):
    steps = generated(tok(ANSWER)["input_ids"], rows[len(PROMPT) - 1:])
    assert list(zip(steps.pieces(tok), steps.dominant(NAMES))) == \
        [(c, (e, pytest.approx(w))) for c, e, w in list(truth.values())[len(PROMPT) - 1:]]
    mean, dominant, counts = _summary(steps.scalings, NAMES)  # a dialogue turn: C, A, T by beta, gamma, alpha
    assert counts == {"alpha": 1, "beta": 1, "gamma": 1} and dominant == "alpha"  # mean (1.06, 0.94, 1.00) / 3
    assert mean == pytest.approx(dict(zip(NAMES, mix[4:].mean(0).tolist())))
    ((line, line_mix),) = line_experts(tok, steps.ids, steps.scalings, NAMES)  # a graph edge's line
    assert line == ANSWER and line_mix == pytest.approx(mean)


def test_the_zero_mixture_has_no_dominant_expert_in_a_dialogue_turn():
    from xlora.demo.dialogue import _summary

    assert _summary(torch.zeros(3, 2, 3), NAMES) == ({n: 0.0 for n in NAMES}, "", {})


SMOLLM2 = [f"model.layers.{i}.{p}" for i in range(30) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
            "mlp.down_proj")]


def test_modules_are_named_grouped_by_decoder_layer_and_one_row_when_shared():
    assert len(SMOLLM2) == 180 and decoder_layer(SMOLLM2[-1]) == 29
    assert decoder_layer("transformer.h.11.attn.c_attn") == 11 and decoder_layer("lm_head") is None
    g = torch.Generator().manual_seed(0)
    layerwise = torch.rand(4, 180, 3, generator=g)
    rows = module_rows(SMOLLM2, layerwise)
    assert rows.labels == [f"layer {i}" for i in range(30)] and rows.groups[3] == list(range(18, 24))
    assert rows.kind == "decoder layer (mean over its 6 adapted modules)"
    torch.testing.assert_close(rows.reduce(layerwise)[:, 3], layerwise[:, 18:24].mean(1))
    shared = torch.rand(4, 1, 3, generator=g).expand(4, 180, 3)  # a head without layerwise_scalings
    assert one_mixture(shared) and not one_mixture(layerwise)
    for r in (module_rows(SMOLLM2, shared), module_rows(SMOLLM2, layerwise, shared=True)):
        assert (r.labels, r.kind) == (["all 180 modules"], "adapted modules (one mixture for all 180)")
    torch.testing.assert_close(module_rows(SMOLLM2, shared).reduce(shared), shared[:, :1])
    odd = module_rows(["enc.q", "enc.v", "lm_head"])
    assert (odd.labels, odd.kind, odd.groups) == (["enc.q", "enc.v", "lm_head"], "adapted module", [[0], [1], [2]])
    uneven = module_rows(["m.layers.0.q", "m.layers.0.v", "m.layers.1.q"])
    assert uneven.labels == ["layer 0", "layer 1"] and uneven.kind == "decoder layer (mean over its adapted modules)"
    with pytest.raises(ValueError, match=r"scalings \(4, 180, 3\) do not fit 3 module names"):
        module_rows(["a", "b", "c"], layerwise)


def test_layer_plot_draws_30_layers_or_one_row(tmp_path):
    pytest.importorskip("matplotlib")
    from xlora.analysis.plots import layer_expert_heatmap

    g = torch.Generator().manual_seed(1)
    layerwise = torch.rand(5, 180, 3, generator=g)
    (page,) = layer_expert_heatmap(layerwise, SMOLLM2, NAMES, tmp_path)  # 30 rows fit one 64-row page
    assert page.y_labels == [f"layer {i}" for i in range(30)]
    assert page.axis_label == "decoder layer (mean over its 6 adapted modules)"
    torch.testing.assert_close(torch.tensor(page.values), layerwise.mean(0).reshape(30, 6, 3).mean(1))
    shared = torch.rand(5, 1, 3, generator=g).expand(5, 180, 3)
    (one,) = layer_expert_heatmap(shared, SMOLLM2, NAMES, tmp_path, stem="shared")
    assert one.y_labels == ["all 180 modules"] and one.axis_label == "adapted modules (one mixture for all 180)"
    assert one.size_px[1] == 50 + 1 * 20 + 90
    torch.testing.assert_close(torch.tensor(one.values), shared[:, 0].mean(0, keepdim=True))
