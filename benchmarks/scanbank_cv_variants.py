"""Scan-bank variants for `leanseq series classify`, scored by cross-validation on the TRAIN split only.

    python benchmarks/scanbank_cv_variants.py                                   # ItalyPowerDemand, every variant
    python benchmarks/scanbank_cv_variants.py --datasets ItalyPowerDemand GunPoint --only baseline full-rows

For each variant and seed (0, 1, 2) a bank is drawn, fitted (no labels) and its ridge head cross-validated
(3 x 5 folds over train series, ScanBankClassifier.fit_head) once per readout; printed: the CV accuracy (% of
train series at full length) of each readout, means over seeds, and the mean of each seed's best readout. The
test split is never read. Results and the choice they led to: docs/series_classify.md ("Tried"). One thread.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from leanseq.series.classification import bank_features, load_dataset
from leanseq.series.scanbank import POOL_CHOICES, ScanBank, ScanBankClassifier, ScanBankConfig

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
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.datasets:
        ds = load_dataset(name)
        for variant in args.only:
            start = time.perf_counter()
            runs = [cv_by_readout(ds, seed, *VARIANTS[variant]) for seed in args.seeds]
            per_readout = " ".join(f"{k} {np.mean([r[k] for r in runs]):.1f}" for k in runs[0])
            best = np.mean([max(r.values()) for r in runs])
            print(f"{name} {variant:26s} best readout per seed {best:.1f} | {per_readout} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
