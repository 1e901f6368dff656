"""`kiln <verb>`: the one command-line entry point.

Each verb lives beside the code it drives: a module listed in COMMANDS exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int | None`. Keep those
modules light at import time (import torch and friends inside `func`) so `kiln --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kiln.errors import KilnError

COMMANDS = [
    "kiln.generate",
    "kiln.serve.cli",
    "kiln.train.pretrain",
    "kiln.train.sft",
    "kiln.train.dpo",
    "kiln.demo",
    "kiln.tokenizer.cli",
    "kiln.eval.bench",
    "kiln.engine.profile",
    "kiln.eval.cli",
    "kiln.quant.cli",
    "kiln.compress.cli",
    "kiln.apps.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: an LLM's whole life.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
