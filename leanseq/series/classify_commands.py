"""`leanseq series classify DATASET...`: our scan bank (or a trained SSM) against aeon's MiniRocket and ROCKET on aeon's bundled sets."""

from __future__ import annotations

from leanseq.argtypes import int_at_least, positive_float, positive_int


def add_subcommand(series_sub) -> None:
    from leanseq.energy import add_cli_arguments
    from leanseq.series.classification import DEFAULT_DATASETS, METHODS, ClassifySettings

    d = ClassifySettings()
    p = series_sub.add_parser(
        "classify",
        help="classify UCR/UEA datasets aeon ships (or your CSV), beside MiniRocket and ROCKET",
        description="Train on each dataset's default train split, score once on its test split, for every seed; "
        "aeon's MiniRocket and ROCKET run on the same split in the same process. Prints a table (accuracy, "
        "anytime accuracy at 25/50/75% of each series, train seconds, joules per classified series, model "
        "size, published figures) and writes classify.md/.json/.png to --out.",
    )
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"aeon dataset names (default: {' '.join(DEFAULT_DATASETS)})")
    p.add_argument("--csv", help="your own data: a CSV with one series per row (every column but --target is a "
                   "time step; trailing empty cells = a shorter series)")
    p.add_argument("--target", help="the CSV column holding each series' class")
    p.add_argument("--test-csv", help="a separate test CSV (same columns); default: a stratified 30%% hold-out")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="scanbank (default): a wide bank of untrained selective-scan channels pooled causally, "
                   "a ridge head fitted in closed form; trained: a small SSM trained by AdamW (--family, "
                   "--hidden-size, --num-layers, --epochs, --lr apply to it)")
    p.add_argument("--bank-width", type=positive_int, default=d.bank_width,
                   help=f"scanbank: scan channels per bank, 4 features each (default {d.bank_width})")
    p.add_argument("--bank-members", type=positive_int, default=d.bank_members,
                   help=f"scanbank: independently drawn banks, one ridge fit each, their class scores averaged "
                   f"(default {d.bank_members}; work per series grows with it)")
    p.add_argument("--bank-raw-limit", type=int_at_least(0), default=d.bank_raw_limit, metavar="N",
                   help="scanbank: offer the CV the series' own normalised values and first differences as a feature "
                   f"block when the longest train series x channels <= N, 0 = never (default {d.bank_raw_limit})")
    p.add_argument("--family", choices=("mamba", "mamba2", "transformer"), default=d.family,
                   help=f"trained: backbone (default {d.family})")
    p.add_argument("--hidden-size", type=positive_int, default=d.hidden_size)
    p.add_argument("--num-layers", type=positive_int, default=d.num_layers)
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"at most (default {d.epochs})")
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--seeds", type=positive_int, default=len(d.seeds), help="number of seeds (default 3)")
    p.add_argument("--no-baselines", action="store_true", help="skip aeon's MiniRocket and ROCKET")
    p.add_argument("--quick", action="store_true", help="seconds: tiny model, few epochs, small slices (tests)")
    p.add_argument("--out", default="leanseq-out/series", help="output folder (default leanseq-out/series)")
    add_cli_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from leanseq.energy import meter_kwargs_from_args
    from leanseq.series.classification import ClassifySettings, classify
    from leanseq.train.lock import OutputDirLock

    if args.csv and args.datasets:
        raise ValueError("give either dataset names or --csv, not both")
    if (args.target or args.test_csv) and not args.csv:
        raise ValueError("--target and --test-csv go with --csv")
    settings = ClassifySettings(method=args.method, bank_width=args.bank_width, family=args.family, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                bank_members=args.bank_members, bank_raw_limit=args.bank_raw_limit, epochs=args.epochs, lr=args.lr, seeds=tuple(range(args.seeds)),
                                baselines=() if args.no_baselines else ClassifySettings.baselines, quick=args.quick)
    lock = OutputDirLock(args.out)
    lock.acquire()
    try:
        report = classify(args.datasets or None, csv=args.csv, target=args.target, test_csv=args.test_csv,
                          settings=settings, out_dir=args.out, meter_kwargs=meter_kwargs_from_args(args))
    finally:
        lock.release()
    print(report["table"])
    print(f"\nwrote {', '.join(report['files'].values())} ({report['wall_s']:.0f} s)")
    return 0
