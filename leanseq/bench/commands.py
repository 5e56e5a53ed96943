"""`leanseq bench context`: the context race between a recurrent model and a transformer on this machine."""

from __future__ import annotations

import argparse

from leanseq.argtypes import command_group


def _arg(parse, what: str):
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    return convert


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be positive, got {text!r}")
        return value

    return parse


def register(subparsers) -> None:
    from leanseq.bench.context import (
        DEFAULT_DECODE_STEPS,
        DEFAULT_PREFILL_CHUNK,
        DEFAULT_TIME_BUDGET,
        DEFAULT_TOTAL_BUDGET,
        parse_bytes,
        parse_length,
    )
    from leanseq.bench.spec import DEFAULT_MODEL_A, DEFAULT_MODEL_B
    from leanseq.energy import add_cli_arguments

    bench_sub = command_group(subparsers, "bench", metavar="BENCHMARK", help="measure models side by side on this machine")

    p = bench_sub.add_parser(
        "context",
        help="per-token cost and memory vs context length: a recurrent model against a transformer",
        description="Stream one seeded random token sequence through two models and measure, at context "
        "lengths min-len, x4, ... up to max-len, the per-token decode latency, CPU time, energy and state "
        "memory, and the whole-stream cost of reading the context. Writes a table, JSON and PNG to --out.",
    )
    p.add_argument("--model-a", default=DEFAULT_MODEL_A,
                   help=f"checkpoint folder or spec family:key=value,... (default {DEFAULT_MODEL_A!r})")
    p.add_argument("--model-b", default=DEFAULT_MODEL_B,
                   help=f"checkpoint folder or spec (default {DEFAULT_MODEL_B!r}; families: mamba, mamba2, transformer)")
    p.add_argument("--min-len", type=_arg(parse_length, "--min-len"), default=None,
                   help="shortest context (default 2^10; --quick: 64)")
    p.add_argument("--max-len", type=_arg(parse_length, "--max-len"), default=None,
                   help="longest context, e.g. 2^20 or 1048576 (default 2^20; --quick: 256)")
    p.add_argument("--len-factor", type=_arg(_positive(int), "--len-factor"), default=None,
                   help="ratio between successive lengths (default 4; --quick: 2)")
    p.add_argument("--decode-steps", type=_arg(_positive(int), "--decode-steps"), default=None,
                   help=f"single steps timed at each context (default {DEFAULT_DECODE_STEPS}; --quick: 8)")
    p.add_argument("--memory-budget", type=_arg(parse_bytes, "--memory-budget"), default="8GB",
                   help="skip a model at a length whose estimated memory exceeds this (default 8GB; bare number = GB)")
    p.add_argument("--time-budget", type=_arg(_positive(float), "--time-budget"), default=DEFAULT_TIME_BUDGET,
                   help="seconds per model per length; skip where the extrapolated time exceeds it "
                   f"(default {DEFAULT_TIME_BUDGET:g})")
    p.add_argument("--total-budget", type=_arg(_positive(float), "--total-budget"), default=DEFAULT_TOTAL_BUDGET,
                   help="seconds for the whole race; skip runs predicted to end past it "
                   f"(default {DEFAULT_TOTAL_BUDGET:g}, so the defaults finish within 10 minutes)")
    p.add_argument("--prefill-chunk", type=_arg(_positive(int), "--prefill-chunk"), default=DEFAULT_PREFILL_CHUNK,
                   help=f"tokens per chunk of a recurrent model's stream (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--threads", type=_arg(_positive(int), "--threads"), default=None,
                   help="torch threads (default: torch's current setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token stream and of spec models' weights")
    p.add_argument("--out", default="leanseq-out/context", help="output folder (default leanseq-out/context)")
    p.add_argument("--quick", action="store_true", help="tiny lengths and few steps, for tests and CI")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cli_arguments(p)
    p.set_defaults(func=run_context_command)


def run_context_command(args: argparse.Namespace) -> int:
    import torch

    from leanseq.bench.context import context_lengths, format_table, run_context_race, write_outputs
    from leanseq.bench.spec import resolve_model
    from leanseq.energy import Meter, meter_kwargs_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    min_len = args.min_len or (64 if quick else 2**10)
    max_len = args.max_len or (256 if quick else 2**20)
    factor = args.len_factor or (2 if quick else 4)
    if factor < 2:
        raise ValueError(f"--len-factor must be >= 2, got {factor}")
    if max_len < min_len:
        raise ValueError(f"--max-len {max_len} is shorter than --min-len {min_len}")
    lengths = context_lengths(min_len, max_len, factor)
    steps = args.decode_steps or (8 if quick else 64)

    _warn_if_busy(torch.get_num_threads())
    model_a, source_a = resolve_model(args.model_a, seed=args.seed, what="--model-a")
    model_b, source_b = resolve_model(args.model_b, seed=args.seed, what="--model-b")
    names = _names(model_a, model_b)
    meter = Meter(**meter_kwargs_from_args(args))
    print(f"{names[0]}: {type(model_a).__name__} ({source_a}), {model_a.num_parameters():,} parameters")
    print(f"{names[1]}: {type(model_b).__name__} ({source_b}), {model_b.num_parameters():,} parameters")
    print(f"contexts {lengths}; {steps} decode steps each; torch threads {torch.get_num_threads()}; "
          f"energy {meter.method}", flush=True)

    results = run_context_race(
        model_a, model_b, lengths, names=names, sources=(source_a, source_b), decode_steps=steps,
        warmup_steps=1 if quick else 4, memory_budget=args.memory_budget, time_budget=args.time_budget,
        total_budget=args.total_budget,
        prefill_chunk=args.prefill_chunk, seed=args.seed, meter=meter, progress=not args.no_progress,
    )
    table = format_table(results)
    paths = write_outputs(results, args.out, table)
    print(table)
    print()
    for line in results["summary"]:
        print(line)
    print(f"total {results['total_wall_s']:.1f} s; wrote {paths['table']}, {paths['json']}, {paths['plot']}")
    return 0


def _warn_if_busy(threads: int) -> None:
    """Other work on the CPUs makes torch's worker threads wait for a core, which distorts per-token timings."""
    import os
    import sys

    from leanseq.energy.machine import load_average

    load, cpus = load_average(), os.cpu_count() or 1
    if load is None:
        return
    if load > cpus - threads + 0.5:
        hint = " (try --threads 1)" if threads > 1 else ""
        print(f"warning: load average {load:.1f} on {cpus} CPUs while this run uses {threads} torch threads: "
              f"other work competes with the benchmark and its timings will be noisy{hint}", file=sys.stderr)


def _names(model_a, model_b) -> tuple[str, str]:
    """Short row labels: the family ('mamba', 'transformer'), suffixed -a/-b when both are the same kind."""
    from leanseq.bench.context import is_transformer

    def family(model):
        return "transformer" if is_transformer(model) else type(model).__name__.removesuffix("LM").lower()

    a, b = family(model_a), family(model_b)
    return (f"{a}-a", f"{b}-b") if a == b else (a, b)
