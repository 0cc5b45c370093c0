"""The `xlora` command: a thin table of subcommands, each calling one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from xlora import commands
from xlora.cli_flags import (
    add_base_flags,
    add_cluster_flags,
    add_dataclass_flags,
    count,
    non_negative,
    positive,
    probability,
)


def _add_format_parsers(sub: argparse._SubParsersAction) -> None:
    """``convert`` and ``export-mistralrs``: other X-LoRA formats (xlora.formats)."""
    p = sub.add_parser("convert", help="convert an X-LoRA directory (ours, original xlora, PEFT, mistral.rs) to another format")
    p.add_argument("src", help="the directory to read; its format is detected")
    p.add_argument("dst", help="the directory to write (experts copied in)")
    p.add_argument("--to", choices=["ours", "peft", "original", "mistralrs"], default="ours")
    p.add_argument("--base", default=None, help="base model path (default: the one recorded in SRC)")
    p.add_argument("--ordering", default=None, help="mistral.rs ordering file, when it is not inside SRC")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST (its other files are kept)")
    p.set_defaults(func=commands.convert)

    p = sub.add_parser("export-mistralrs", help="write mistral.rs's X-LoRA layout and print the command that serves it")
    p.add_argument("model_dir", help="an X-LoRA directory in any format xlora reads")
    p.add_argument("out", help="a new folder for the export")
    p.add_argument("--base", default=None, help="base model path (default: the one recorded in MODEL_DIR)")
    p.add_argument("--base-model-id", default=None, help="what mistral.rs loads the base from (default: --base)")
    p.add_argument("--tgt-non-granular-index", type=positive, default=None,
                   help="mistral.rs: fix the scalings after this many decoding steps (put on the printed command)")
    p.set_defaults(func=commands.export_mistralrs)


def _add_app_parsers(sub: argparse._SubParsersAction) -> None:
    """``graph`` and ``dialogue``: the demo's applications (xlora.demo.graph, xlora.demo.dialogue)."""
    p = sub.add_parser("graph", help="a knowledge graph from a text file: triples coloured by the expert that wrote them")
    p.add_argument("text_file", help="a UTF-8 text file")
    p.add_argument("--out", required=True, help="folder for graph.graphml, graph.json, graph.png and graph.html")
    p.add_argument("--chunk-chars", type=positive, default=600, help="characters per chunk (whole sentences)")
    p.add_argument("--max-new-tokens", type=positive, default=128, help="tokens per chunk's answer")
    p.add_argument("--assets", default=None, help="an X-LoRA directory (default: the demo's)")
    p.add_argument("--base", default=None, help="base model directory (default: the demo's SmolLM2)")
    p.set_defaults(func=commands.graph)

    p = sub.add_parser("dialogue", help="two agents on the X-LoRA model take turns; the experts are traced per turn")
    p.add_argument("--topic", required=True, help="what the agents discuss")
    p.add_argument("--turns", type=positive, default=6)
    p.add_argument("--agent-a", default=None, help="agent A's system prompt (default: a questioning scientist)")
    p.add_argument("--agent-b", default=None, help="agent B's system prompt (default: a critical reviewer)")
    p.add_argument("--out", default="xlora-dialogue", help="folder for transcript.md, dialogue.json and the plot")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="tokens per turn")
    p.add_argument("--max-context", type=positive, default=512, help="prompt + answer tokens per turn; older turns dropped")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty, > 0 (default: 1.3; 1.0 is plain greedy decoding)")
    p.add_argument("--assets", default=None, help="an X-LoRA directory (default: the demo's)")
    p.add_argument("--assets-b", default=None, help="agent B's own X-LoRA directory (default: agent A's model)")
    p.add_argument("--base", default=None, help="base model directory (default: the demo's SmolLM2)")
    p.set_defaults(func=commands.dialogue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlora", description="X-LoRA: a mixture of LoRA experts over a causal LM")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo_parsers, _add_app_parsers, _add_model_parsers, _add_serve_parser, _add_train_parser,
                _add_distill_parser, _add_format_parsers):
        add(sub)
    return parser


def _add_demo_parsers(sub: argparse._SubParsersAction) -> None:
    """``example``, ``demo`` and ``eval``: the in-process example and the embedded demo (xlora.demo)."""
    p = sub.add_parser("example", help="build a tiny model and two experts in-process and print the X-LoRA scalings")
    p.add_argument("--seq-len", type=positive, default=8, help="number of tokens in the example sequence")
    p.set_defaults(func=commands.example)

    p = sub.add_parser("demo", help="the embedded demo: SmolLM2-135M with seven science experts (protein, mechanics, "
                                    "chemistry, quantum, mathematics, general, graph) on prompts worded as none it trained on")
    p.add_argument("--retrain", action="store_true",
                   help="retrain the seven experts and the head from the shipped science rows first (several hours on "
                        "2 CPU cores; rerun to continue)")
    p.add_argument("--out", default=None, help="folder for the table and heatmaps (default: $XLORA_CACHE/demo)")
    p.add_argument("-n", type=positive, default=4, help="test_unseen records per domain for the losses (default: 4)")
    p.add_argument("--n-generate", type=positive, default=1, help="records per domain answered and scored (default: 1; each costs about 20 s)")
    p.set_defaults(func=commands.demo)

    p = sub.add_parser("eval", help="does the mixture help on my data? X-LoRA against the base, every expert, the "
                                    "uniform mix, PEFT's Arrow and the oracle (no MODEL_DIR: the earlier five-domain "
                                    "demo assets)")
    p.add_argument("model_dir", nargs="?", default=None, help="an X-LoRA directory in any format xlora reads")
    p.add_argument("--out", default="xlora-eval",
                   help="folder for eval.md, eval.json, eval_records.jsonl, eval.png (default: xlora-eval)")
    _add_eval_data_flags(p)
    g = p.add_argument_group("the demo's evaluation (without MODEL_DIR)")
    keep, demo = argparse.SUPPRESS, commands.DEMO_EVAL_DEFAULTS  # absent unless given: refused with MODEL_DIR
    g.add_argument("-n", type=positive, default=keep, help=f"test records per domain for the losses (default: {demo['n']})")
    g.add_argument("--n-generate", type=positive, default=keep,
                   help=f"records per domain answered and scored (default: {demo['n_generate']})")
    g.add_argument("--splits", nargs="+", choices=["test", "test_unseen", "validation"], default=keep,
                   help="test: seen phrasings; test_unseen: held-out phrasings (default: both)")
    g.add_argument("--graph-n", type=count, default=keep,
                   help=f"held-out passages for the triple F1 table (0: skip; default: {demo['graph_n']})")
    g.add_argument("--assets", default=keep, help="an X-LoRA directory over the demo base (default: the shipped one)")
    p.set_defaults(func=commands.evaluate)
    p = sub.add_parser("compare", help="two xlora eval runs of the same records (say two models): loss ratio and top-1 "
                                       "routing difference with paired 95 %% intervals")
    p.add_argument("runs", nargs=2, metavar="EVAL_DIR", help="folders written by xlora eval --out (eval_records.jsonl)")
    p.add_argument("--splits", nargs="+", default=None, help="compare these subfolders of both runs (suite_eval's layout)")
    p.add_argument("--row", default="xlora", help="the row compared (default: xlora)")
    p.set_defaults(func=commands.compare)


def _add_eval_data_flags(p: argparse.ArgumentParser) -> None:
    """``xlora eval MODEL_DIR --data FILE ...``: the evaluation engine (xlora.analysis.evaluate)."""
    g = p.add_argument_group("your model on your data (with MODEL_DIR)")
    g.add_argument("--data", nargs="+", metavar="FILE", default=None,
                   help="held-out records: messages, prompt/completion or text, with optional domain and check")
    g.add_argument("--base", default=None, help="base model path (default: the one recorded in MODEL_DIR)")
    keep = argparse.SUPPRESS  # EvalConfig's defaults: one source of truth (the help repeats them)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=keep,
                   help="render prompt/completion records as a chat (default: when the tokenizer has a template)")
    g.add_argument("--arrow-top-k", type=positive, default=keep, metavar="K", help="experts PEFT's Arrow mixes (default 3)")
    g.add_argument("--generate", type=count, default=keep, metavar="N", help="greedy answers per domain, scored")
    g.add_argument("--max-new-tokens", type=positive, default=keep, help="tokens per generated answer (default 64)")
    g.add_argument("--expert-answers", choices=["all", "own"], default=keep,
                   help="all: every expert answers every sampled record (default); own: only its own domain's")
    g.add_argument("--max-records", type=positive, default=keep, metavar="N", help="read at most N records")
    g.add_argument("--batch-size", type=positive, default=keep, help="records per forward (default 8)")
    g.add_argument("--answer-batch-size", type=positive, default=keep, metavar="N",
                   help="prompts answered together (default: 2 x --batch-size; on a GPU its KV cache is twice the size)")
    g.add_argument("--skip-bad", action="store_true", default=keep, help="skip and count bad records instead of stopping")
    g.add_argument("--resamples", type=count, default=keep, metavar="B",
                   help="bootstrap resamples of the 95%% intervals of X-LoRA's loss over each row's (default 2000; 0: none)")


def _add_model_parsers(sub: argparse._SubParsersAction) -> None:
    """``generate`` and ``inspect``: one X-LoRA directory, one prompt."""
    p = sub.add_parser("generate", help="stream text from an X-LoRA model directory")
    p.add_argument("model_dir", help="directory written by XLoraModel.save_pretrained")
    p.add_argument("prompt", help="the prompt text")
    add_base_flags(p)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--show-experts", action="store_true", help="print the dominant expert of every generated token")
    p.add_argument("--max-new-tokens", type=positive, default=64)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--granularity", choices=["token", "prompt"], default="token")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=commands.generate)

    p = sub.add_parser("inspect", help="show which experts a prompt (and its answer) uses: table, colours, plots")
    p.add_argument("model_dir", help="directory written by XLoraModel.save_pretrained")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--generate", type=count, default=0, metavar="N", help="also generate N tokens greedily")
    p.add_argument("--out", default="xlora-inspect", help="folder for the scalings log, stats.json and the plots")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--base", default=None, help="base model path (default: the one recorded in the directory)")
    p.add_argument("--per-page", type=positive, default=None, help="rows per plot file (default 64)")
    p.set_defaults(func=commands.inspect)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``serve``: flags left unset keep ServerConfig's defaults (one source of truth)."""
    p = sub.add_parser("serve", help="serve an X-LoRA model over an OpenAI-compatible HTTP API")
    p.add_argument("model_dir", help="directory written by XLoraModel.save_pretrained")
    add_base_flags(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    keep = argparse.SUPPRESS  # defaults live in ServerConfig
    p.add_argument("--host", default=keep, help="(default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=keep, help="(default: 8000)")
    p.add_argument("--api-key", default=keep, help="require 'Authorization: Bearer KEY' (default: $XLORA_API_KEY)")
    p.add_argument("--model-name", default=keep, help="the model id clients send (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=keep, help="the most requests decoded together (default: 8)")
    p.add_argument("--batch-window-ms", type=float, default=keep, help="wait for more requests (default: 10)")
    p.add_argument("--max-queue", type=int, default=keep, help="more waiting requests get HTTP 429 (default: 256)")
    p.add_argument("--max-tokens-limit", type=int, default=keep, help="largest max_tokens allowed (default: 4096)")
    p.add_argument("--max-prompt-tokens", type=int, default=keep, help="(default: the model's context length)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=non_negative, default=keep, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, running requests get this long, then end with an OpenAI error (default: 30)")
    add_cluster_flags(p)
    p.set_defaults(func=commands.serve)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``train``: one flag per TrainConfig and XLoraConfig field."""
    from xlora import XLoraConfig
    from xlora.train.config import TrainConfig

    p = sub.add_parser("train", help="train the X-LoRA scaling head (runs under accelerate launch / torchrun too)")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="JSON or YAML file of these options (keys: the flags' names, with - or _; relative paths "
                        "from the file's folder); flags given here override it")
    add_dataclass_flags(p, TrainConfig, skip={"xlora"}, required={"base_model", "train_file", "output_dir"})
    add_dataclass_flags(p, XLoraConfig, skip={"hidden_size", "num_adapted_modules", "base_model_name_or_path"},
                         required={"experts"})
    p.set_defaults(func=commands.train)


def _add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """``distill``: flags left unset keep DistillConfig's defaults (xlora.train.distill, one source of truth)."""
    p = sub.add_parser("distill", help="train a head over the first K decoder layers to give a teacher X-LoRA's scalings")
    p.add_argument("teacher_dir", help="the teacher: an X-LoRA directory (its head runs all its layers)")
    p.add_argument("output_dir", help="where the student X-LoRA directory goes")
    p.add_argument("--layers", dest="scaling_pass_layers", type=positive, default=argparse.SUPPRESS, metavar="K",
                   help="decoder layers of the student's scaling pass (1..N; default: all N, to correct a head at "
                        "its own depth with --routing-weight)")
    p.add_argument("--data", dest="train_file", required=True, metavar="FILE", help="training records (as xlora train)")
    keep = argparse.SUPPRESS
    p.add_argument("--eval", dest="eval_file", default=keep, metavar="FILE",
                   help="held-out records for the initial and final KL and top-1 agreement (default: --data)")
    p.add_argument("--steps", type=positive, default=keep, help="optimizer steps (default: 500)")
    p.add_argument("--batch-size", type=positive, default=keep, help="examples per step (default: 8)")
    p.add_argument("--lr", dest="learning_rate", type=float, default=keep, help="peak learning rate (default: 1e-3)")
    p.add_argument("--warmup-steps", type=count, default=keep, help="linear warm-up, then cosine decay (default: 0)")
    p.add_argument("--loss", choices=["kl", "mse"], default=keep, help="KL(teacher || student) or MSE (default: kl)")
    p.add_argument("--temperature", type=float, default=keep, help="KL temperature (default: the teacher's)")
    p.add_argument("--lm-weight", type=non_negative, default=keep, help="add this times the LM loss (default: 0)")
    p.add_argument("--positions", choices=["all", "scored", "unrouted"], default=keep,
                   help="tokens the distillation averages: all (default), scored (those predicting a completion) or "
                        "unrouted (those taking no routing loss)")
    p.add_argument("--scored-weight", type=non_negative, default=keep,
                   help="add this times the KL (or MSE) over the scored positions only, where answers are routed "
                        "(default: 0)")
    p.add_argument("--routing-weight", type=non_negative, default=keep,
                   help="add this times the routing cross-entropy of the records naming their expert (default: 0)")
    p.add_argument("--routing-key", default=keep, help="the record field naming the expert (default: domain)")
    p.add_argument("--weight-decay", type=non_negative, default=keep, help="AdamW weight decay (default: 0)")
    p.add_argument("--save-every", type=count, default=keep,
                   help="checkpoint every N steps into OUTPUT_DIR; a rerun continues from it (default: 50; 0: never)")
    p.add_argument("--init", default=keep, metavar="teacher|scratch|DIR",
                   help="start from the teacher head's weights, a fresh head, or the head of the X-LoRA directory DIR "
                        "(same head shape; e.g. an earlier student) (default: teacher)")
    p.add_argument("--prefix-mean", dest="prefix_mean", action=argparse.BooleanOptionalAction, default=keep,
                   help="the student's head also reads the running mean of the states, which carries the prompt to a "
                        "shallow pass (head_prefix_mean; default: as the teacher)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=keep,
                   help="render prompt/completion records with the chat template, as xlora train --chat (default: no)")
    p.add_argument("--max-length", type=positive, default=keep, help="tokens per example (default: 512)")
    p.add_argument("--seed", type=count, default=keep, help="data order and a fresh head's weights (default: 0)")
    p.add_argument("--base", dest="base_model", default=keep, help="base model path (default: the teacher's)")
    p.add_argument("--device", default=keep, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", default=keep, help="write into a non-empty OUTPUT_DIR")
    p.set_defaults(func=commands.distill)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"xlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
