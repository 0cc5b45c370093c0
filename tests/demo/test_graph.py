"""``xlora graph`` on a tiny model scripted (by construction, :mod:`scripted`) to answer two chunks with fixed lines:
extraction with per-line experts from the recorded scalings, entity merging, and all four output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TARGETS, make_expert
from scripted import script_answers, scripted_model

from xlora import XLoraConfig, XLoraModel
from xlora.demo.evaluate import chat_messages
from xlora.demo.graph import (
    Edge,
    build_graph,
    chunk_text,
    extract,
    graph_prompt,
    line_experts,
    make_graph,
    write_outputs,
)

nx = pytest.importorskip("networkx")
pytest.importorskip("pyvis")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")

# Two chunks whose prompts differ in length by more than the first answer: the script answers both.
TEXT = "Silk is strong. Bone is hard, and bone is much harder than silk is."
CHUNK_CHARS = 60
ANSWERS = ["silk | is | strong\nnot a triple", "Bone | is | hard\nSILK | is |  Strong"]  # what the model learns


def newline_tokenizer():
    """conftest's character tokenizer plus ``\\n`` (triples are lines): printable ASCII and newline, 100 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


@pytest.fixture(scope="module")
def taught(tmp_path_factory, one_thread):
    """A tiny GPT-2 scripted to answer the two chunks of TEXT with ANSWERS by a wide logit margin (on any CPU),
    under two random experts and X-LoRA's random router."""
    tok = newline_tokenizer()
    prompts, answers = [], []
    for chunk, answer in zip(chunk_text(TEXT, CHUNK_CHARS), ANSWERS):
        prompt = tok.apply_chat_template(chat_messages({"prompt": graph_prompt(chunk)}, answer=False), tokenize=False,
                                         add_generation_prompt=True)
        prompts.append(tok(prompt, add_special_tokens=False)["input_ids"])
        answers.append(tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    base = scripted_model(script_answers(prompts, answers), len(tok), max(map(len, prompts)) + 48)
    root = tmp_path_factory.mktemp("graph")
    experts = {n: str(make_expert(base, root / n, r=4, alpha=8, targets=GPT2_TARGETS, seed=i + 1))
               for i, n in enumerate(["graph", "general"])}
    model = XLoraModel(base, XLoraConfig(experts=experts, head_depth=1, global_scaling_weight=0.2)).eval()
    return model, tok


def test_chunks_are_whole_sentences_within_the_limit():
    text = "One two three. Four five six!\n\nSeven eight nine? " + "x" * 50 + " end."
    chunks = chunk_text(text, 30)
    assert chunks == ["One two three. Four five six!", "Seven eight nine?", "x" * 30, "x" * 20 + " end."]
    assert chunk_text("A. B. C.", 600) == ["A. B. C."] and chunk_text("  \n ", 600) == []
    with pytest.raises(ValueError, match="max_chars"):
        chunk_text(text, 5)


def test_extraction_parses_lines_counts_malformed_and_merges_duplicates(taught):
    model, tok = taught
    result = extract(model, tok, chunk_text(TEXT, CHUNK_CHARS), max_new_tokens=40)
    assert result.outputs == ANSWERS  # the greedy answers (under X-LoRA's random router) are the taught ones
    assert [(e.subject, e.relation, e.object, e.chunk) for e in result.edges] == [("silk", "is", "strong", 0),
                                                                                  ("Bone", "is", "hard", 1)]
    assert result.malformed == [{"chunk": 0, "line": "not a triple"}] and result.duplicates == 1
    for e in result.edges:  # each edge's expert is the argmax of its mean scalings, which sum to 1
        assert e.expert == max(e.scalings, key=e.scalings.get) and sum(e.scalings.values()) == pytest.approx(1.0)


def test_line_experts_average_the_tokens_of_each_line():
    tok = newline_tokenizer()
    ids = tok("ab\ncd", add_special_tokens=False)["input_ids"]  # 5 tokens: a b \n c d
    s = torch.zeros(5, 3, 2)  # [n, L, E]
    s[:, :, 0] = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0])[:, None]
    s[:, :, 1] = 1 - s[:, :, 0]
    lines = line_experts(tok, ids, s, ["graph", "general"])
    assert [text for text, _ in lines] == ["ab", "cd"]
    assert lines[0][1]["graph"] == pytest.approx((1 + 1 + 0.5) / 3)  # a, b and the newline that ends the line
    assert lines[1][1] == {"graph": pytest.approx(0.0), "general": pytest.approx(1.0)}


def test_all_output_files_on_the_tiny_model(taught, tmp_path):
    model, tok = taught
    (tmp_path / "text.txt").write_text(TEXT)
    g, extraction, paths = make_graph(model, tok, TEXT, tmp_path / "out", chunk_chars=CHUNK_CHARS, max_new_tokens=40)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["graph.graphml", "graph.html", "graph.json",
                                                                   "graph.png"]
    # entities merged by case and whitespace: "silk" / "SILK", "strong" / " Strong"
    assert sorted(g.nodes) == ["bone", "hard", "silk", "strong"] and g.number_of_edges() == 2
    back = nx.read_graphml(paths["graphml"])
    assert sorted(back.nodes) == sorted(g.nodes) and back.number_of_edges() == 2
    assert {d["relation"] for *_, d in back.edges(data=True)} == {"is"}
    doc = json.loads(paths["json"].read_text())
    assert doc["n_malformed"] == 1 and doc["duplicates"] == 1 and doc["chunks"] == chunk_text(TEXT, CHUNK_CHARS)
    assert sum(doc["edges_per_expert"].values()) == 2 and doc["experts"] == ["graph", "general"]
    assert {(e["source"], e["target"]) for e in doc["edges"]} == {("silk", "strong"), ("bone", "hard")}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    html = paths["html"].read_text()
    assert "vis-network" in html and '"label": "is"' in html and "src=\"http" not in html  # offline page
    assert html.count('"from": ') == 2


def test_multigraph_keeps_parallel_relations_and_colours_by_expert(tmp_path):
    from xlora.analysis.plots import expert_color

    edges = [Edge("Silk Fibroin", "has secondary structure", "beta sheet", 0, "graph", {"graph": 0.9, "general": 0.1}),
             Edge("silk  fibroin", "is stabilized by", "Beta Sheet", 1, "general", {"graph": 0.3, "general": 0.7}),
             Edge("nacre", "has property", "toughness", 1, "graph", {"graph": 0.6, "general": 0.4})]
    g = build_graph(edges)
    assert g.number_of_nodes() == 4 and g.number_of_edges() == 3
    assert g.nodes["silk fibroin"] == {"label": "Silk Fibroin", "mentions": 2}
    assert sorted(d["relation"] for d in g.get_edge_data("silk fibroin", "beta sheet").values()) == [
        "has secondary structure", "is stabilized by"]
    from xlora.demo.graph import Extraction

    paths = write_outputs(g, Extraction(["c0", "c1"]), tmp_path, ["graph", "general"])
    html = paths["html"].read_text()
    assert expert_color(0) in html and expert_color(1) in html  # edges coloured by their expert
    doc = json.loads(paths["json"].read_text())
    assert doc["edges_per_expert"] == {"graph": 2, "general": 1}
    back = nx.read_graphml(paths["graphml"])
    assert back.number_of_edges() == 3 and {d["expert"] for *_, d in back.edges(data=True)} == {"graph", "general"}


def test_cli_graph_refuses_a_missing_file(tmp_path, capsys):
    from xlora.cli import main

    assert main(["graph", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()
