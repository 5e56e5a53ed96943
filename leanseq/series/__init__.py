"""Time series: real-valued inputs for the leanseq backbones (encoder.py), and the workloads built on them.

    from leanseq.series import SeriesModel
    model = SeriesModel.build("mamba", channels=1, out_features=3, task="classify")
    bank = ScanBank(ScanBankConfig(channels=1), seed=0)   # untrained selective-scan features (scanbank.py)

Heavy dependencies (aeon, statsforecast) are imported only by the workload functions that use them.
"""

from __future__ import annotations

import importlib

from leanseq.series.encoder import SeriesConfig, SeriesModel, ValueEncoder, gather_last
from leanseq.series.scanbank import ScanBank, ScanBankClassifier, ScanBankConfig

# workload entry points, imported on first use (they pull in aeon, matplotlib, ...)
_LAZY = {"classify": "leanseq.series.classification", "forecast": "leanseq.series.forecasting",
         "anomalies": "leanseq.series.anomaly_detection"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["ScanBank", "ScanBankClassifier", "ScanBankConfig", "SeriesConfig", "SeriesModel", "ValueEncoder",
           "anomalies", "classify", "forecast", "gather_last"]
