"""`leanseq repro induction | selective-copy` (the Mamba paper's synthetic tables) and `leanseq demo`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from leanseq.argtypes import command_group, positive_float, positive_int


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and training streams")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny lengths, 3 steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    sub = command_group(subparsers, "repro", metavar="EXPERIMENT", help="reproduce the Mamba paper's synthetic results on this machine")

    p = sub.add_parser(
        "induction", help="Induction Heads: train at 256, test at 2^6 .. 2^20 (Mamba paper Table 11 / Table 2)",
        description="Train a 2-layer Mamba (D=64) and two transformers of about the same size (absolute "
        "positions, RoPE) on Induction Heads at length 256, then measure accuracy at test lengths up to 2^20. "
        "Writes repro_induction.md (beside the paper's Table 11), .json and .png to --out. Training resumes "
        "from --out/train/<model>/ when a run is there, so a rerun with more --steps continues it.",
    )
    _common(p, "leanseq-out/repro/induction")
    p.add_argument("--steps", type=positive_int, default=None, help="Mamba training steps (default 2000)")
    p.add_argument("--transformer-steps", type=positive_int, default=None,
                   help="training steps of each transformer (default 2000)")
    p.add_argument("--lr", type=positive_float, default=None, help="Mamba learning rate (default 3e-3)")
    p.add_argument("--transformer-lr", type=positive_float, default=None, help="transformer lr (default 1e-3)")
    p.add_argument("--models", default=None, help="comma-separated subset of mamba,mha-abs,mha-rope")
    p.add_argument("--curriculum", type=parse_curriculum, default=None,
                   help="stages trained first, e.g. 64x32:500 = 500 steps of batch 32 at length 64 "
                   "(comma-separated, shortest first; for every model unless --transformer-curriculum is given)")
    p.add_argument("--transformer-curriculum", type=parse_curriculum, default=None,
                   help="the transformers' own curriculum (default: --curriculum)")
    p.add_argument("--max-len", type=positive_int, default=None, help="longest test length (default 2^20)")
    p.add_argument("--eval-tokens", type=positive_int, default=None,
                   help="tokens per model and length; samples = this / length within [min, max] (default 65536)")
    p.add_argument("--min-samples", type=positive_int, default=None, help="fewest sequences per length (default 2)")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="seconds per transformer and length before it is skipped (default 120)")
    p.add_argument("--memory-budget-gb", type=positive_float, default=None,
                   help="GB per transformer evaluation batch before it is skipped (default 8)")
    p.set_defaults(func=run_induction_command)

    p = sub.add_parser(
        "selective-copy", help="Selective Copying: the LTI (S4-like) layer vs the selective layer (Table 1)",
        description="Train 2-layer Mambas with the LTI layer (MambaConfig(selective=False)) and the selective "
        "layer on Selective Copying and compare their accuracy with the Mamba paper's Table 1. Writes "
        "repro_selective_copy.md, .json and .png to --out.",
    )
    _common(p, "leanseq-out/repro/selective-copy")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps per model (default 2000)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 3e-3)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="context length (default 256; paper 4096)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default 8)")
    p.add_argument("--models", default=None, help="comma-separated subset of lti,selective")
    p.add_argument("--curriculum", type=parse_curriculum, default=None,
                   help="stages trained first at shorter contexts, e.g. 32x64:500 (the same for both models)")
    p.set_defaults(func=run_selective_copy_command)

    from leanseq.bench.demo import register_demo

    register_demo(subparsers)


def parse_curriculum(text: str) -> tuple[tuple[int, int, int], ...]:
    """'64x32:500,128x16:200' -> ((64, 32, 500), (128, 16, 200)): length x batch : steps per stage."""
    stages = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            shape, steps = item.split(":")
            length, batch = shape.lower().split("x")
            stage = (int(length), int(batch), int(steps))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"curriculum stage {item!r} is not LENGTHxBATCH:STEPS, e.g. 64x32:500") from None
        if min(stage) < 1:
            raise argparse.ArgumentTypeError(f"curriculum stage {item!r}: every number must be positive")
        stages.append(stage)
    if not stages:
        raise argparse.ArgumentTypeError("--curriculum is empty; e.g. 64x32:500")
    return tuple(stages)


def _models(text: str | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"--models: unknown model(s) {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


def command_line(what: str) -> str:
    """The command as typed, for the outputs' provenance line; `what` when leanseq was called from Python."""
    import os

    if sys.argv and os.path.basename(sys.argv[0]) == "leanseq":
        return "leanseq " + " ".join(sys.argv[1:])
    return f"{what} (called from Python)"


def run_induction_command(args) -> int:
    import torch

    from leanseq.bench import repro

    torch.set_num_threads(args.threads)
    s = repro.quick_induction_settings() if args.quick else repro.InductionSettings()
    s.seed = args.seed
    s.mamba = dataclasses.replace(s.mamba, seed=args.seed, **_set(steps=args.steps, lr=args.lr))
    s.transformer = dataclasses.replace(s.transformer, seed=args.seed,
                                        **_set(steps=args.transformer_steps, lr=args.transformer_lr))
    s.models = _models(args.models, ("mamba", "mha-abs", "mha-rope")) or s.models
    if args.curriculum:
        s.mamba = dataclasses.replace(s.mamba, curriculum=args.curriculum)
    if args.transformer_curriculum or args.curriculum:
        s.transformer = dataclasses.replace(s.transformer, curriculum=args.transformer_curriculum or args.curriculum)
    if args.max_len:
        s.test_lengths = tuple(n for n in s.test_lengths if n <= args.max_len) or (args.max_len,)
    for key, value in (("eval_tokens", args.eval_tokens), ("min_samples", args.min_samples),
                       ("time_budget", args.time_budget)):
        if value is not None:
            setattr(s, key, value)
    if args.memory_budget_gb:
        s.memory_budget = args.memory_budget_gb * 1e9
    results = repro.run_induction(s, args.out, progress=not args.no_progress)
    table = repro.format_induction_table(results)
    paths = repro.write_results(results, args.out, "repro_induction", table, repro.plot_induction,
                                command=command_line("leanseq repro induction"))
    print(table)
    print(f"wrote {paths['table']}, {paths['json']} and {paths['plot']}")
    return 0


def run_selective_copy_command(args) -> int:
    import torch

    from leanseq.bench import repro

    torch.set_num_threads(args.threads)
    s = repro.quick_selective_copy_settings() if args.quick else repro.SelectiveCopySettings()
    s.seed = args.seed
    s.train = dataclasses.replace(s.train, seed=args.seed,
                                  **_set(steps=args.steps, lr=args.lr, batch_size=args.batch_size))
    if args.seq_len:
        s.seq_len = args.seq_len
    s.models = _models(args.models, ("lti", "selective")) or s.models
    if args.curriculum:
        s.train = dataclasses.replace(s.train, curriculum=args.curriculum)
    results = repro.run_selective_copy(s, args.out, progress=not args.no_progress)
    table = repro.format_selective_copy_table(results)
    paths = repro.write_results(results, args.out, "repro_selective_copy", table, repro.plot_selective_copy,
                                command=command_line("leanseq repro selective-copy"))
    print(table)
    print(f"wrote {paths['table']}, {paths['json']} and {paths['plot']}")
    return 0


def _set(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}
