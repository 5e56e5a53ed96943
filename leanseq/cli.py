"""The `leanseq` command. Each subsystem registers its own subcommands; this file only wires them up.

Errors: an expected failure (a bad setting, file, checkpoint or state blob; a NaN loss; a busy output folder)
prints one line, `leanseq <command>: error: <what is wrong>`, and exits with 1; anything else prints one line
naming the exception type and asking for --debug. `--debug`, before or after the command, shows the full
traceback instead. Ctrl-C exits with 130 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Modules that define `register(subparsers)`; each adds its subcommand(s) and sets `func` on the parser.
COMMAND_MODULES = [
    "leanseq.models.commands",
    "leanseq.train.commands",
    "leanseq.bench.commands",
    "leanseq.bench.repro_commands",
    "leanseq.text.commands",
    "leanseq.text.gen_commands",
    "leanseq.post.commands",
    "leanseq.post.export_commands",
    "leanseq.series.commands",
    "leanseq.dna.commands",
    "leanseq.serve.commands",
]

# What a user's input or environment can cause; the message alone says what to fix. ConfigError,
# CheckpointError, StateBlobError and TrainCheckpointError are ValueErrors; TOML and JSON parse errors too;
# OutputDirBusyError and missing files are OSErrors; FloatingPointError is the trainer's NaN-loss stop.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)
DEBUG_HELP = "show the full traceback on errors (accepted before or after the command)"


def _subcommand_parsers(parser: argparse.ArgumentParser):
    """Every parser below `parser`, depth first (each once, though aliases list it again)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield sub
                yield from _subcommand_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanseq", description="Lean sequence models, measured side by side.")
    from leanseq import __version__

    parser.add_argument("--version", action="version", version=f"leanseq {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in _subcommand_parsers(parser):
        # SUPPRESS: when --debug is not given after the command, the value set before it stands
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sub.set_defaults(command_name=sub.prog)  # the innermost command's wins: "leanseq bench context"
    return parser


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (some messages, e.g. torch's, span several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = getattr(args, "command_name", f"leanseq {args.command}")

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {one_line(message)}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = show_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"{name}: error: unexpected {type(exc).__name__}: {one_line(exc)} "
              f"(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
