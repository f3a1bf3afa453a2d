"""Command-line interface: `pyengine <command> [options]`.

Each command is a module with `add_parser(subparsers)` (its options) and `run(args)` (what it
does, returning an exit code), registered in COMMANDS. train / finetune / distill / evaluate
take their flags from the typed options of `pyengine.train.config` and their work from
`pyengine.train.recipes`; this package only parses, reports and prints.
"""

from __future__ import annotations

import argparse
import functools
import sys

import pyengine
from pyengine.cli import average, bench, demo, export, generate
from pyengine.cli import run as recipes_cli
from pyengine.serve import cli as serve_cli

COMMANDS = {
    "demo": (demo.add_parser, demo.run),
    "train": (functools.partial(recipes_cli.add_parser, name="train"),
              functools.partial(recipes_cli.run, name="train")),
    "finetune": (functools.partial(recipes_cli.add_parser, name="finetune"),
                 functools.partial(recipes_cli.run, name="finetune")),
    "distill": (functools.partial(recipes_cli.add_parser, name="distill"),
                functools.partial(recipes_cli.run, name="distill")),
    "evaluate": (functools.partial(recipes_cli.add_parser, name="evaluate"),
                 functools.partial(recipes_cli.run, name="evaluate")),
    "generate": (generate.add_parser, generate.run),
    "export": (export.add_parser, export.run),
    "average": (average.add_parser, average.run),
    "bench": (bench.add_parser, bench.run),
    "serve": (serve_cli.add_parser, serve_cli.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyengine",
        description="Fused C++/Triton kernels for training LSTM language models.")
    parser.add_argument("--version", action="version", version=f"pyengine {pyengine.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser, run in COMMANDS.values():
        add_parser(subparsers).set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen command; returns exit code."""
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
