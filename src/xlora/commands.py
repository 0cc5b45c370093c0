"""What each ``xlora`` subcommand does with its parsed flags: one library call each (see :mod:`xlora.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path


def _out_folder(flag: str, path: str) -> Path:
    """:func:`xlora.files.output_folder`, and not an X-LoRA model directory: outputs would mix with its files."""
    from xlora.config import CONFIG_FILE
    from xlora.files import output_folder

    folder = output_folder(flag, path)
    if (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{flag} {str(folder)!r} is an X-LoRA model directory; writing there would mix outputs into "
                         "the model's files; choose another folder")
    return folder


def example(args: argparse.Namespace) -> int:
    from xlora.demo.tiny import run_example

    run_example(seq_len=args.seq_len)
    return 0


def demo(args: argparse.Namespace) -> int:
    from xlora.demo.run import run_demo

    return run_demo(retrain=args.retrain, out_dir=args.out, n_per_domain=args.n, n_generate=args.n_generate)


# `xlora eval` without MODEL_DIR: the demo's evaluation flags and, for the help (which must not import torch),
# xlora.demo.run.run_eval's defaults for them (a test keeps the two equal)
DEMO_EVAL_DEFAULTS: dict[str, Any] = {"n": 64, "n_generate": 16, "splits": ("test", "test_unseen"), "graph_n": 32,
                                      "assets": None}


def evaluate(args: argparse.Namespace) -> int:
    given = vars(args)
    if args.model_dir is not None or args.data is not None:
        demo_only = [name for name in DEMO_EVAL_DEFAULTS if name in given]
        if demo_only:
            flag = "-n" if demo_only[0] == "n" else "--" + demo_only[0].replace("_", "-")
            raise ValueError(f"{flag} applies to the demo's evaluation (xlora eval without MODEL_DIR); with MODEL_DIR "
                             "--data FILE use --max-records N, --generate N and your own files instead")
        _out_folder("--out", args.out)
        return eval_model(args)
    from xlora.analysis.evaluate import EvalConfig

    model_only = [f.name for f in dataclasses.fields(EvalConfig) if f.name in given]
    if model_only or args.base is not None:
        flag = "--" + (model_only[0] if model_only else "base").replace("_", "-")
        raise ValueError(f"{flag} applies to xlora eval MODEL_DIR --data FILE; without MODEL_DIR the demo's "
                         "evaluation runs (its flags: -n, --n-generate, --splits, --graph-n, --assets)")
    from xlora.demo.run import run_eval

    demo = {"n_per_domain" if k == "n" else k: tuple(v) if k == "splits" else v
            for k, v in given.items() if k in DEMO_EVAL_DEFAULTS}  # the flags given; run_eval's defaults for the rest
    return run_eval(_out_folder("--out", args.out), **demo)


def eval_model(args: argparse.Namespace) -> int:
    from xlora.analysis.evaluate import EvalConfig, run_eval
    from xlora.train.data import tokenize_record  # the trainer's record parsing: one for training and evaluation
    from xlora.train.records import iter_records

    if args.model_dir is None or not args.data:
        raise ValueError("xlora eval MODEL_DIR needs --data FILE [FILE ...] (held-out records), and --data needs "
                         "MODEL_DIR; run `xlora eval` with neither for the embedded demo")
    given = vars(args)  # the flags given (the others are absent: EvalConfig's defaults apply)
    config = EvalConfig(**{f.name: given[f.name] for f in dataclasses.fields(EvalConfig) if f.name in given})
    run_eval(args.model_dir, args.data, tokenize_record=tokenize_record, read_records=iter_records,
             base_model=args.base, out_dir=args.out, config=config)
    return 0


def compare(args: argparse.Namespace) -> int:
    from xlora.analysis.eval_intervals import compare_runs

    print(compare_runs(*args.runs, splits=args.splits, row=args.row), end="")
    return 0


def graph(args: argparse.Namespace) -> int:
    from xlora.demo.graph import run_graph

    return run_graph(args.text_file, _out_folder("--out", args.out), assets=args.assets, base_dir=args.base,
                     chunk_chars=args.chunk_chars, max_new_tokens=args.max_new_tokens)


def dialogue(args: argparse.Namespace) -> int:
    from xlora.demo.dialogue import REPETITION_PENALTY, run_dialogue

    if not args.topic.strip():
        raise ValueError("--topic is empty; say what the agents discuss, e.g. --topic 'spider silk mechanics'")
    _out_folder("--out", args.out)
    penalty = REPETITION_PENALTY if args.repetition_penalty is None else args.repetition_penalty
    return run_dialogue(args.topic, args.out, turns=args.turns, agent_a=args.agent_a, agent_b=args.agent_b,
                        assets=args.assets, assets_b=args.assets_b, base_dir=args.base,
                        max_new_tokens=args.max_new_tokens, max_context=args.max_context, repetition_penalty=penalty)


def generate(args: argparse.Namespace) -> int:
    from xlora.generation import generate_text
    from xlora.pretrained import load_model_and_tokenizer

    if not args.prompt.strip():
        raise ValueError("prompt is empty; give the text to continue (or a question, with --chat)")
    if args.temperature == 0 and args.top_p != 1.0:
        raise ValueError(f"--top-p {args.top_p} applies to sampling, and --temperature is 0 (greedy); set "
                         "--temperature > 0 (e.g. 0.7) or leave --top-p out")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, base_model=args.base, **base_kwargs(args))
    sampling = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    out = sys.stdout
    text, ids, scalings = generate_text(
        model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
        stream=lambda piece: (out.write(piece), out.flush()), granularity=args.granularity, **sampling,
    )
    out.write("\n")
    if not text.strip() and not args.chat:
        print(empty_answer_hint(tokenizer, ids), file=sys.stderr)
    if args.show_experts:  # each token with the mixture that wrote it (xlora.analysis.views)
        from xlora.analysis.views import generated

        answer = generated(ids, scalings)
        out.write(f"{'#':>4}  {'token':<16} {'written by':<16} weight (layer-averaged mixture at the step before)\n")
        for i, (piece, (name, weight)) in enumerate(zip(answer.pieces(tokenizer),
                                                        answer.dominant(model.xlora_config.expert_names))):
            out.write(f"{i:>4}  {piece!r:<16} {name:<16} {weight:.3f}\n")
    return 0


def empty_answer_hint(tokenizer: Any, ids: list[int]) -> str:
    """One line for an empty answer without --chat: an instruct model given raw text often ends its turn at once."""
    first = repr(tokenizer.convert_ids_to_tokens(ids[0])) if ids else "none"
    if getattr(tokenizer, "chat_template", None):
        return (f"xlora generate: the answer is empty (first token {first}); an instruct model expects its chat "
                "template: add --chat")
    return f"xlora generate: the answer is empty (first token {first}); try another prompt"


def base_kwargs(args: argparse.Namespace) -> dict:
    from xlora.saving import base_load_kwargs

    if args.load_in_8bit:  # bitsandbytes logs its float16 cast on every 8-bit matmul (840 lines for 2 tokens): once
        import logging

        logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _Once) for f in logger.filters):
            logger.addFilter(_Once())
    return base_load_kwargs(args.dtype, args.load_in_8bit, args.load_in_4bit)


class _Once:
    """A logging filter that lets each distinct message through once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        first = message not in self.seen
        self.seen.add(message)
        return first


def inspect(args: argparse.Namespace) -> int:
    from xlora.analysis.inspect import run_inspect

    if not args.prompt.strip():
        raise ValueError("prompt is empty; give the text whose experts to show")
    run_inspect(args.model_dir, args.prompt, generate=args.generate, out_dir=_out_folder("--out", args.out),
                chat=args.chat, base_model=args.base, per_page=args.per_page)
    return 0


def serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from xlora.serve.app import ServerConfig
    from xlora.serve.app import serve as serve_one

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if hasattr(args, f.name)}
    given.setdefault("model_name", Path(args.model_dir).resolve().name)
    given.setdefault("api_key", os.environ.get("XLORA_API_KEY") or None)
    from xlora.serve.cluster import ClusterConfig, serve_cluster  # imports Ray only when it runs

    cluster = {f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterConfig) if hasattr(args, f.name)}
    config, load = ServerConfig(**given), {"base_model": args.base, "log_level": args.log_level, **base_kwargs(args)}
    if cluster:  # --replicas and friends: Ray Serve replicas (the cluster extra)
        serve_cluster(args.model_dir, config, ClusterConfig(**cluster), **load)
    else:
        serve_one(args.model_dir, config, **load)
    return 0


def train(args: argparse.Namespace) -> int:
    from xlora.train.config import TrainConfig, read_config_file

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    data = read_config_file(args.config) if getattr(args, "config", None) else {}  # may lack what flags give
    data.update(given)
    cfg = TrainConfig.from_dict(data)  # a bad option is refused before the base or the data is loaded
    from xlora.train.trainer import TrainingError
    from xlora.train.trainer import train as train_head

    try:
        result = train_head(cfg)
    except TrainingError as err:
        print(f"xlora train: error: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 130
    if result.finished_before:  # train() said so
        return 0
    ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"trained {result.steps} steps: train loss {result.train_loss:.4f}{ev}; model in {result.output_dir}")
    return 0


def distill(args: argparse.Namespace) -> int:
    from xlora.train.distill import DistillConfig
    from xlora.train.distill import distill as distill_head
    from xlora.train.loop_checkpoint import stop_on_signals

    # the flags given, under DistillConfig's names (the others keep its defaults; no --layers: every layer)
    given = {"scaling_pass_layers": None, **vars(args)}
    cfg = DistillConfig(**{f.name: given[f.name] for f in dataclasses.fields(DistillConfig) if f.name in given})
    with stop_on_signals():  # kill / Ctrl-C: checkpoint after this step, then exit
        result = distill_head(cfg)
    first, last = result.initial, result.final
    kl = f"KL {first['kl']:.4f} -> {last['kl']:.4f}, " if "kl" in last else ""
    own = (f", own-expert routing {first['own_top1']:.3f} -> {last['own_top1']:.3f} (teacher "
           f"{last['teacher_own_top1']:.3f}, {last['routed_records']} records)") if "own_top1" in last else ""
    print(f"distilled {result.steps} steps in {result.seconds:.1f} s: {kl}top-1 agreement {first['top1']:.3f} -> "
          f"{last['top1']:.3f}{own}; student in {result.output_dir}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from xlora.pretrained import convert as convert_dir

    kind = convert_dir(args.src, args.dst, base_model=args.base, to=args.to, ordering=args.ordering,
                       overwrite=args.overwrite)
    print(f"read {args.src} ({kind} format), wrote {args.dst} ({args.to} format)")
    return 0


def export_mistralrs(args: argparse.Namespace) -> int:
    from xlora.pretrained import export_mistralrs as export_dir

    _out_folder("out", args.out)  # a file or an unwritable place: refused before the model loads
    print(export_dir(args.model_dir, args.out, base_model=args.base, base_model_id=args.base_model_id,
                     tgt_non_granular_index=args.tgt_non_granular_index))
    return 0
