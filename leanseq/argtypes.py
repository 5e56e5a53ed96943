"""argparse helpers shared by every room's subcommands: `type=` converters (a bad number is refused by argparse
with a one-line message naming the flag, before any work starts) and command groups (`leanseq dna classify`)."""

from __future__ import annotations

import argparse
import math


def command_group(subparsers, name: str, metavar: str = "COMMAND", **parser_kwargs):
    """Add the group `leanseq NAME SUBCOMMAND ...` -> its subparsers, for the room to add its subcommands to.
    `leanseq NAME` alone prints the group's help and exits with 2."""
    group = subparsers.add_parser(name, **parser_kwargs)
    sub = group.add_subparsers(dest=f"{name}_command", metavar=metavar)
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    return sub


def int_at_least(low: int):
    """A converter for integers >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (NaN and infinity are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value
