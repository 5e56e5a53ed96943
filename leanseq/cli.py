"""The `leanseq` command. Each subsystem registers its own subcommands; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each adds its subcommand(s) and sets `func` on the parser.
COMMAND_MODULES = [
    "leanseq.models.commands",
    "leanseq.train.commands",
    "leanseq.bench.commands",
    "leanseq.bench.repro_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanseq", description="Lean sequence models, measured side by side.")
    from leanseq import __version__

    parser.add_argument("--version", action="version", version=f"leanseq {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"leanseq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
