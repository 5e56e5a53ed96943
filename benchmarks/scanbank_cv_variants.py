"""Scan-bank variants for `leanseq series classify`, scored by cross-validation on the TRAIN split only.

    python benchmarks/scanbank_cv_variants.py                                   # ItalyPowerDemand, every variant
    python benchmarks/scanbank_cv_variants.py --datasets ItalyPowerDemand GunPoint --only baseline full-rows
    python benchmarks/scanbank_cv_variants.py --datasets ItalyPowerDemand --nested 2 --shipped shipped ensemble-3x4096

For each variant and seed (0, 1, 2) a bank is drawn, fitted (no labels) and its ridge head cross-validated
(3 x 5 folds over train series, ScanBankClassifier.fit_head) once per readout; printed: the CV accuracy (% of
train series at full length) of each readout, means over seeds, and the mean of each seed's best readout. With
--shipped: the shipped head's whole CV choice (rows, readout, penalty) on banks of other widths or ensembles
(fit_head(members=...)), each seed's CV accuracy and choice, the bank's CPU-ms per series read, and with
--nested R the accuracy of the whole procedure on held-out train series (R x 5 outer folds). The
test split is never read. Results and the choice they led to: docs/series_classify.md ("Tried"). One thread.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from leanseq.series.classification import ClassifySettings, bank_features, load_dataset, raw_steps_for
from leanseq.series.scanbank import POOL_CHOICES, ScanBank, ScanBankClassifier, ScanBankConfig, _folds

# name -> (timescale as a multiple of the longest train series, log of the fastest step size, width, rows fitted)
ALL, FULL = (1.0, 0.75, 0.5), (1.0,)
VARIANTS = {
    "baseline": (1.0, 0.0, 4096, ALL),  # the bank as shipped, head fitted on the 100/50/75% rows
    "faster-steps": (1.0, 1.5, 4096, ALL),  # step sizes up to e^1.5 per observation (sub-step memories)
    "timescale-x0.5": (0.5, 0.0, 4096, ALL),
    "timescale-x0.25": (0.25, 0.0, 4096, ALL),
    "timescale-x4": (4.0, 0.0, 4096, ALL),
    "width-8192": (1.0, 0.0, 8192, ALL),
    "full-rows": (1.0, 0.0, 4096, FULL),  # head fitted on the full-length rows alone
    "rows-100+75": (1.0, 0.0, 4096, (1.0, 0.75)),  # the 50% rows dropped, the 75% rows kept
    "full-rows+faster-steps": (1.0, 1.5, 4096, FULL),
    "full-rows+timescale-x0.5": (0.5, 0.0, 4096, FULL),
    "full-rows+width-8192": (1.0, 0.0, 8192, FULL),
}

# The shipped head's full CV (rows, readout and penalty chosen together, as fit_scanbank does), on banks of other
# widths, read through one ridge head or as an ensemble of `members` equal parts (fit_head(members=...): each part
# its own ridge fit, their scores averaged), or with the raw block offered to the CV (the first values of the series
# and their differences, ScanBankConfig.raw_steps; "raw-always": only readouts with it). name -> (total width,
# members, raw block: "off" | "offered" | "always"; the raw block only where the longest series x channels <= 512)
RAW_LIMIT = 512  # --bank-raw-limit of the raw variants (the shipped default is 0: off)
SHIPPED = {
    "shipped": (4096, 1, "off"),
    "width-12288": (12288, 1, "off"),
    "ensemble-2x4096": (8192, 2, "off"),
    "ensemble-3x4096": (12288, 3, "off"),
    "ensemble-5x4096": (20480, 5, "off"),
    "raw": (4096, 1, "offered"),
    "raw-always": (4096, 1, "always"),
}


def cv_shipped(ds, seed: int, width: int, members: int, raw: str = "off", nested: int = 0) -> dict:
    """fit_head's CV on the whole train split; with nested > 0 also the accuracy of the whole procedure (its own
    CV choice included) on held-out train series: `nested` x 5 outer folds, fit_head re-run on each outer train
    part. The bank's unsupervised fit (normaliser, PPV thresholds) sees every train series, labels never."""
    settings = ClassifySettings(bank_width=width, bank_raw_limit=0 if raw == "off" else RAW_LIMIT)
    config = ScanBankConfig(channels=ds.channels, width=width, state_size=settings.bank_state_size,
                            timescale=max(len(s) for s in ds.x_train), raw_steps=raw_steps_for(ds, settings))
    choices = tuple(c + ("raw",) for c in POOL_CHOICES) if raw == "always" else None
    bank = ScanBank(config, seed=seed).fit(ds.x_train, seed=seed)
    start = time.process_time()
    feats = bank_features(bank, ds.x_train, (1.0, *settings.readout_cuts))
    read_ms = 1000 * (time.process_time() - start) / len(ds.x_train)  # the bank's work per series read (one pass)
    labels = np.searchsorted(ds.classes, ds.y_train)
    model = ScanBankClassifier(bank, len(ds.classes))
    info = model.fit_head(feats, labels, seed=seed, members=members, choices=choices)
    if nested:
        hits = 0
        for r in range(nested):
            for train, held in _folds(labels, 5, seed + 7 + 1000 * r):
                model.fit_head(feats[train], labels[train], seed=seed, members=members, choices=choices)
                with torch.no_grad():
                    scores = model.head(torch.from_numpy(feats[held, 0]))
                hits += int((scores.argmax(-1).numpy() == labels[held]).sum())
        info["nested_accuracy"] = 100 * hits / (nested * len(labels))
    return {**info, "read_ms": read_ms}


def cv_by_readout(ds, seed: int, scale: float, log_fastest: float, width: int, fractions: tuple) -> dict:
    config = ScanBankConfig(channels=ds.channels, width=width,
                            timescale=max(1, round(scale * max(len(s) for s in ds.x_train))))
    bank = ScanBank(config, seed=seed)
    if log_fastest:  # redraw the step sizes log-uniformly up to e^log_fastest (the bank draws them up to 1)
        g = torch.Generator().manual_seed(seed + 5)
        lo = math.log(0.5 / config.timescale)
        dt = torch.exp(lo + (log_fastest - lo) * torch.rand(width, generator=g))
        bank.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    bank.fit(ds.x_train, seed=seed)
    feats = bank_features(bank, ds.x_train, fractions)
    labels = np.searchsorted(ds.classes, ds.y_train)
    model = ScanBankClassifier(bank, len(ds.classes))
    return {"+".join(c): model.fit_head(feats, labels, choices=(c,), cut_choices=(None,), seed=seed)["cv_accuracy"]
            for c in POOL_CHOICES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["ItalyPowerDemand"])
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--shipped", nargs="+", choices=sorted(SHIPPED),
                    help="instead of --only: these widths / ensembles with the shipped head's full CV (rows, readout, "
                    "penalty chosen together); prints each seed's CV accuracy and choice")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--nested", type=int, default=0, metavar="R",
                    help="with --shipped: also R x 5-fold nested CV of the whole procedure (choice included)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.datasets:
        ds = load_dataset(name)
        for variant in args.shipped or ():
            start = time.perf_counter()
            runs = [cv_shipped(ds, seed, *SHIPPED[variant], nested=args.nested) for seed in args.seeds]
            seeds = ", ".join(f"{r['cv_accuracy']:.1f} ({'+'.join(r['pools'])}, rows {r['cuts']}, alpha "
                              f"{r['alpha']:.3g})" for r in runs)
            nested = ("" if not args.nested else " | nested " + " ".join(f"{r['nested_accuracy']:.1f}" for r in runs)
                      + f" mean {np.mean([r['nested_accuracy'] for r in runs]):.2f}")
            print(f"{name} {variant:24s} CV mean {np.mean([r['cv_accuracy'] for r in runs]):.2f}{nested} | per seed "
                  f"{seeds} | bank CPU-ms per series read {np.mean([r['read_ms'] for r in runs]):.1f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        for variant in () if args.shipped else args.only:
            start = time.perf_counter()
            runs = [cv_by_readout(ds, seed, *VARIANTS[variant]) for seed in args.seeds]
            per_readout = " ".join(f"{k} {np.mean([r[k] for r in runs]):.1f}" for k in runs[0])
            best = np.mean([max(r.values()) for r in runs])
            print(f"{name} {variant:26s} best readout per seed {best:.1f} | {per_readout} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
