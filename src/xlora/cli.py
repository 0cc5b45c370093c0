"""The `xlora` command: a thin table of subcommands, each calling one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _example(args: argparse.Namespace) -> int:
    from xlora.example import run_example

    run_example(seq_len=args.seq_len)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlora", description="X-LoRA: a mixture of LoRA experts over a causal LM")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("example", help="build a tiny model and two experts in-process and print the X-LoRA scalings")
    p.add_argument("--seq-len", type=int, default=8, help="number of tokens in the example sequence")
    p.set_defaults(func=_example)
    return parser


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
