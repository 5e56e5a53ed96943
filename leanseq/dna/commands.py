"""`leanseq dna classify` and `leanseq dna long-range`."""

from __future__ import annotations

import sys
from pathlib import Path

from leanseq.argtypes import command_group, positive_float, positive_int


def register(subparsers) -> None:
    from leanseq.energy import add_cli_arguments

    sub = command_group(subparsers, "dna", help="DNA sequence classification (FASTA in), reverse-complement aware")

    p = sub.add_parser(
        "classify", help="CNN, transformer and Mamba (with and without RC handling) side by side over seeds",
        description="Train each model for --seeds seeds on the training records and report accuracy, ROC-AUC "
        "(95%% bootstrap interval), parameters, training joules and joules per classified sequence; "
        "classify.md/.json/.png go to --out. Default data: janggu's Oct4 vs Mafk ChIP-seq peaks (make setup). "
        "Your own data: --fasta CLASS=FILE per class, or --fasta FILE --labels TSV (name<TAB>label).",
    )
    p.add_argument("--fasta", action="append", default=None, metavar="[CLASS=]FILE",
                   help="training FASTA: CLASS=FILE once per class, or one FILE with --labels")
    p.add_argument("--labels", default=None, help="label table for a single --fasta (name<TAB>label or BED-like)")
    p.add_argument("--test", action="append", default=None, metavar="[CLASS=]FILE",
                   help="test FASTA, as --fasta (default: a fixed-seed 20%% split of the training records)")
    p.add_argument("--test-labels", default=None, help="label table for a single --test")
    p.add_argument("--iupac", choices=("n", "refuse"), default="n",
                   help="IUPAC ambiguity codes: read as N (default) or refuse the file")
    p.add_argument("--seeds", type=positive_int, default=5, help="training seeds per model (default 5)")
    p.add_argument("--models", default=None, help="comma-separated subset of the models (default: all)")
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="also K-fold cross-validation on the training records, beside the test split (K >= 2; "
                   "one run per fold and model; whole 100 kb windows per fold)")
    p.add_argument("--out", default="leanseq-out/dna", help="output folder (default leanseq-out/dna)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="training runs at once, each in its own process (default 2, for 2 cores; 1: one after "
                   "another in this process)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per training run (default 1: these small models gain little from a second "
                   "thread, and a second thread stalls whenever another process holds a core)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run: 1 epoch, 512 training and 64 test records")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cli_arguments(p)
    p.set_defaults(func=_classify)

    p = sub.add_parser(
        "long-range", help="two JASPAR motifs up to the whole sequence apart: accuracy and joules vs length",
        description="Mamba, transformer and CNN trained on a curriculum of short lengths and evaluated at "
        "every length up to --max-length within a time and memory budget per length; long_range.md/.json/.png "
        "go to --out. See leanseq/dna/long_range.py for the task.",
    )
    p.add_argument("--max-length", type=positive_int, default=1 << 15, help="longest evaluation length (default 32768)")
    p.add_argument("--n-test", type=positive_int, default=None, help="test sequences per length (default 200)")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="CPU-seconds per model and length for the evaluation (default 180)")
    p.add_argument("--memory-budget", type=positive_float, default=None, help="GiB per model and length (default 4)")
    p.add_argument("--out", default="leanseq-out/dna", help="output folder (default leanseq-out/dna)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: these small models gain little from a second thread, and a "
                   "second thread stalls whenever another process holds a core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny models, lengths 128 and 512")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cli_arguments(p)
    p.set_defaults(func=_long_range)


def _fasta_arg(values, labels, what: str):
    """--fasta values -> {class: path} or one path (then labels are required)."""
    if not values:
        return None
    if all("=" in v for v in values):
        pairs = [v.split("=", 1) for v in values]
        mapping = {k: v for k, v in pairs}
        if len(mapping) != len(pairs):
            raise ValueError(f"--{what}: a class is named twice")
        return mapping
    if len(values) == 1 and labels:
        return values[0]
    raise ValueError(f"--{what}: give CLASS=FILE once per class, or one FILE with --{what}-labels"
                     .replace("--fasta-labels", "--labels"))


def _classify(args) -> int:
    import dataclasses

    import torch

    from leanseq.dna.classify import ClassifySettings, classify, default_specs, format_table, quick_specs
    from leanseq.energy import meter_kwargs_from_args

    torch.set_num_threads(args.threads)
    specs = quick_specs() if args.quick else default_specs()
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        known = {s.name: s for s in specs}
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(known)}")
        specs = [known[m] for m in wanted]
    settings = ClassifySettings(seeds=args.seeds, iupac=args.iupac, specs=specs, cv=args.cv)
    if args.quick:
        settings = dataclasses.replace(settings, max_train=512, max_test=64, n_boot=100)
    fasta = _fasta_arg(args.fasta, args.labels, "fasta")
    test = _fasta_arg(args.test, args.test_labels, "test")
    log = lambda message: print(message, file=sys.stderr)  # the table alone goes to stdout
    report = classify(fasta, args.labels, test, args.test_labels, settings, out_dir=args.out,
                      progress=not args.no_progress, log=log, meter_kwargs=meter_kwargs_from_args(args),
                      jobs=args.jobs, threads=args.threads)
    print(format_table(report), end="")
    print(f"written: {Path(args.out) / 'classify.json'}, classify.md, classify.png; models in "
          f"{Path(args.out) / 'classify-models'}")
    return 0


def _long_range(args) -> int:
    import dataclasses

    import torch

    from leanseq.dna.long_range import LongRangeSettings, format_table, quick_settings, run_long_range
    from leanseq.energy import meter_kwargs_from_args

    torch.set_num_threads(args.threads)
    settings = quick_settings() if args.quick else LongRangeSettings()
    lengths = tuple(n for n in settings.eval_lengths if n <= args.max_length)
    if not args.quick and args.max_length > settings.eval_lengths[-1]:
        n = settings.eval_lengths[-1] * 2
        while n <= args.max_length:
            lengths += (n,)
            n *= 2
    if not lengths:
        raise ValueError(f"--max-length {args.max_length} is below the shortest evaluation length "
                         f"{settings.eval_lengths[0]}")
    overrides = {"eval_lengths": lengths, "seed": args.seed}
    for key, value in (("n_test", args.n_test), ("time_budget_s", args.time_budget),
                       ("memory_budget_gib", args.memory_budget)):
        if value is not None:
            overrides[key] = value
    settings = dataclasses.replace(settings, **overrides)
    log = lambda message: print(message, file=sys.stderr)
    report = run_long_range(settings, out_dir=args.out, progress=not args.no_progress, log=log,
                            meter_kwargs=meter_kwargs_from_args(args))
    print(format_table(report), end="")
    print(f"written: {Path(args.out) / 'long_range.json'}, long_range.md, long_range.png")
    return 0
