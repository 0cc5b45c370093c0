"""Flag builders and argument types of the `xlora` command (:mod:`xlora.cli`): base-model loading, Ray Serve
replicas, one flag per dataclass field, and numbers refused outside their range with the value named."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_base_flags(p: argparse.ArgumentParser) -> None:
    """How to load the base model: its dtype and an optional bitsandbytes quantisation."""
    p.add_argument("--base", default=None, help="base model path (default: the one recorded in the directory)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="load the base in this dtype (default: the checkpoint's)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-in-8bit", action="store_true", help="quantise the base to 8 bits (bitsandbytes)")
    quant.add_argument("--load-in-4bit", action="store_true", help="quantise the base to 4-bit nf4 (bitsandbytes)")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """``xlora serve --replicas N ...``: Ray Serve replicas of the same app (xlora.serve.cluster)."""
    keep = argparse.SUPPRESS  # defaults live in ClusterConfig
    g = p.add_argument_group("Ray Serve replicas (pip install 'xlora[cluster]')")
    g.add_argument("--replicas", type=positive, default=keep, metavar="N",
                   help="serve N model copies, each with its own batcher, behind Ray Serve's HTTP proxy")
    g.add_argument("--ray-address", default=keep, metavar="ADDR",
                   help="join a running Ray cluster ('auto' after `ray start`; default: a fresh local instance)")
    g.add_argument("--cpus-per-replica", type=non_negative, default=keep, metavar="C",
                   help="Ray CPUs (and torch threads) per replica (default: 1)")
    g.add_argument("--gpus-per-replica", type=non_negative, default=keep, metavar="G",
                   help="Ray GPUs per replica; fractions share a GPU (default: 0)")
    g.add_argument("--min-replicas", type=count, default=keep, help="autoscaling: the fewest replicas (default 1)")
    g.add_argument("--max-replicas", type=positive, default=keep, help="autoscaling: the most (default: --replicas)")
    g.add_argument("--target-ongoing-requests", type=non_negative, default=keep,
                   help="autoscaling: the ongoing requests per replica Ray Serve aims for")
    g.add_argument("--object-store-mb", type=positive, default=keep,
                   help="the local Ray instance's object store (default: Ray's)")


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: set[str], required: set[str]) -> None:
    """One flag per dataclass field (``--field-name``), defaults left to the dataclass (one source of truth),
    its help the field's entry in the class docstring's ``Args:``."""
    import dataclasses
    import typing

    hints, docs = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = "required, here or in --config" if f.name in required else \
            f"default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
        doc = f"{docs.get(f.name, '')} ({default})".strip().replace("%", "%%")
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=doc)
        elif f.name == "experts":
            p.add_argument(flag, nargs="+", metavar="NAME=PATH", default=argparse.SUPPRESS,
                           help=f"the experts, in order: NAME=PATH of each PEFT LoRA adapter folder ({default})")
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            p.add_argument(flag, type=args[0], default=argparse.SUPPRESS, help=doc)


def field_help(cls: type) -> dict[str, str]:
    """``{field: text}`` from the Google-style ``Args:`` of ``cls``'s docstring (``a / b:`` entries share a text)."""
    import inspect
    import re

    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[lines.index("Args:") + 1:] if "Args:" in lines else []:
        entry = re.match(r"^    ([\w ]+(?: / [\w ]+)*): (.*)$", line)
        if entry:
            current = [entry.group(2)]
            found.update({name.strip(): current for name in entry.group(1).split(" / ")})
        elif line.startswith("        "):
            current.append(line.strip())
        elif line.strip():
            break  # the next section
    return {name: " ".join(text).replace("``", "") for name, text in found.items()}


def number(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside ``ok`` (naming the value)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # `not ok` also refuses nan
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive = number(int, lambda v: v >= 1, "a positive integer")
count = number(int, lambda v: v >= 0, "an integer >= 0")
non_negative = number(float, lambda v: v >= 0, "a number >= 0")
probability = number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
