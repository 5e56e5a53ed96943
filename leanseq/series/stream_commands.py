"""`leanseq series forecast` and `leanseq series anomalies`: added to the `leanseq series` group by
leanseq/series/commands.py (SUBCOMMAND_MODULES)."""

from __future__ import annotations

import argparse
import sys

from leanseq.argtypes import int_at_least, positive_int

DEFAULT_OUT = "leanseq-out/series"


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", default=None, help="a CSV file to read instead of (or beside) the named series")
    p.add_argument("--target", default=None, help="the CSV's numeric column to use")
    p.add_argument("--family", choices=("mamba", "mamba2", "transformer"), default="mamba",
                   help="the streaming model (default mamba)")
    p.add_argument("--hidden-size", type=positive_int, default=None, help="model width (default 32)")
    p.add_argument("--layers", type=positive_int, default=None, help="model layers (default 2)")
    p.add_argument("--steps", type=positive_int, default=None, help="most training steps (early stopping chooses)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and training windows")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny model, few steps, short slices")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args) -> dict:
    pairs = {"hidden_size": args.hidden_size, "num_layers": args.layers, "steps": args.steps, "seed": args.seed,
             "threads": args.threads, "family": args.family}
    return {k: v for k, v in pairs.items() if v is not None}


def add_subcommand(sub) -> None:
    """Adds both `forecast` and `anomalies` to the `leanseq series` group."""
    from leanseq.series.sources import FORECAST_SOURCES

    p = sub.add_parser(
        "forecast", help="walk-forward streaming forecasts vs SeasonalNaive, AutoETS, AutoARIMA and a transformer",
        description="Train on the first part of each series, then read the rest one observation at a time through a "
        "leanseq.stream.Session, forecasting 1..horizon steps ahead after each. statsforecast's SeasonalNaive, "
        "AutoETS and AutoARIMA (fitted on the same training part, updated walk-forward) and a transformer of the same "
        "size run in the same process. Prints MAE/MASE, per-update latency and joules per update; writes "
        "forecast.md, .json and .png to --out. Series: " + ", ".join(FORECAST_SOURCES) + ".")
    p.add_argument("series", nargs="*", help="named series (see above; default all of them)")
    _common(p)
    p.add_argument("--season", type=positive_int, default=None,
                   help="seasonal period (for --csv; default 1 = none; overrides a named series' own)")
    p.add_argument("--horizon", type=positive_int, default=None, help="steps ahead forecast at every origin (default 4)")
    p.add_argument("--test-fraction", type=fraction, default=None, help="scored tail of each series (default 0.2)")
    p.add_argument("--compare", default="transformer",
                   help="a second leanseq family of the same size and training ('none' to skip; default transformer)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated statsforecast baselines (default SeasonalNaive,AutoETS,AutoARIMA; 'none')")
    p.set_defaults(func=run_forecast_command)

    p = sub.add_parser(
        "anomalies", help="streaming anomaly scores vs aeon's detectors (ROC-AUC, PR-AUC, latency)",
        description="Train a model on the normal data of each labelled series, then score every observation as it "
        "arrives by its forecast error (read one at a time through a leanseq.stream.Session). aeon's DWT_MLEAD and "
        "KMeansAD score the same series in the same process. Prints ROC-AUC, PR-AUC and time per observation; writes "
        "anomalies.md, .json and .png to --out. Series: kdd-tsad-135, ecg-diff-count-3.")
    p.add_argument("series", nargs="*", help="kdd-tsad-135 and/or ecg-diff-count-3 (default both)")
    _common(p)
    p.add_argument("--labels", default=None, help="with --csv: the 0/1 anomaly label column")
    p.add_argument("--normal-fraction", type=fraction, default=0.3,
                   help="with --csv: the leading fraction of rows that is normal training data (default 0.3)")
    p.add_argument("--smooth", type=int_at_least(1), default=None,
                   help="causal mean of the forecast error over this many observations (default 8)")
    p.set_defaults(func=run_anomalies_command)


def _names(text: str | None):
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(filter(None, (s.strip() for s in text.split(","))))


def run_forecast_command(args) -> int:
    from leanseq.series.forecasting import forecast, table

    overrides = _overrides(args)
    for key, value in (("horizon", args.horizon), ("test_fraction", args.test_fraction)):
        if value is not None:
            overrides[key] = value
    overrides["compare"] = "" if args.compare.strip().lower() == "none" else args.compare.strip()
    if overrides["compare"] not in ("", "mamba", "mamba2", "transformer"):
        raise ValueError(f"--compare must be mamba, mamba2, transformer or none, got {args.compare!r}")
    baselines = _names(args.baselines)
    if baselines is not None:
        overrides["baselines"] = baselines
    series = args.series
    if not series and args.csv is None:
        from leanseq.series.sources import forecast_series_names

        series = forecast_series_names()  # no names: every series that ships
    results = forecast(series, csv=args.csv, target=args.target, season=args.season, out=args.out,
                       quick=args.quick, progress=not args.no_progress, command=_command_line(), **overrides)
    print(table(results))
    print("wrote " + ", ".join(results["files"].values()))
    return 0


def run_anomalies_command(args) -> int:
    from leanseq.series.anomaly_detection import anomalies, table

    overrides = _overrides(args)
    if args.smooth is not None:
        overrides["smooth"] = args.smooth
    series = args.series
    if not series and args.csv is None:
        series = ["kdd-tsad-135", "ecg-diff-count-3"]  # no names: both labelled series that ship
    results = anomalies(series, csv=args.csv, target=args.target, labels_column=args.labels,
                        normal_fraction=args.normal_fraction, out=args.out, quick=args.quick,
                        progress=not args.no_progress, command=_command_line(), **overrides)
    print(table(results))
    print("wrote " + ", ".join(results["files"].values()))
    return 0


def _command_line() -> str:
    """The command as typed, for the report's header (these functions run only from the CLI)."""
    return "leanseq " + " ".join(sys.argv[1:])
