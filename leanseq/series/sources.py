"""Univariate series for forecasting and anomaly detection, loaded from data that ships inside installed packages
(aeon, pmdarima, statsmodels) or from a user's CSV. Nothing is downloaded.

    y, info = load_forecast_series("airline")        # float64 (n,), {"season": 12, ...}
    x, labels, normal, info = load_anomaly_series("kdd-tsad-135")

Missing values: a forecasting series with gaps (statsmodels' co2 has 59 missing weeks) is filled by carrying
the last observed value forward, which uses nothing from the future; `info["filled"]` counts the filled points
and every report states it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ForecastSource:
    name: str
    season: int  # period used by SeasonalNaive, the seasonal models and the MASE scale
    description: str
    package: str
    last: int | None = None  # keep only the last `last` observations (a long series made affordable)


FORECAST_SOURCES = {
    s.name: s
    for s in (
        ForecastSource("airline", 12, "monthly airline passengers 1949-1960 (aeon load_airline)", "aeon"),
        ForecastSource("lynx", 10, "annual Canadian lynx trappings 1821-1934 (aeon load_lynx)", "aeon"),
        ForecastSource("shampoo", 12, "monthly shampoo sales over 3 years (aeon load_shampoo_sales)", "aeon"),
        ForecastSource("solar", 48, "half-hourly GB national solar estimate, 6 days (aeon load_solar)", "aeon"),
        ForecastSource("msft", 1, "daily MSFT close 1986-2017 (pmdarima load_msft); season 1 = naive", "pmdarima"),
        ForecastSource("taylor", 48, "half-hourly England & Wales electricity demand, last 2,000 of 4,032 points "
                       "(pmdarima load_taylor)", "pmdarima", last=2000),
        ForecastSource("co2", 52, "weekly Mauna Loa CO2 1958-2001 (statsmodels co2)", "statsmodels"),
        ForecastSource("sunspots", 11, "yearly sunspot numbers 1700-2008 (statsmodels sunspots)", "statsmodels"),
    )
}
ALIASES = {"shampoosales": "shampoo", "shampoo_sales": "shampoo", "load_taylor": "taylor", "sunspot": "sunspots"}


def _raw_forecast_values(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aeon/pmdarima deprecation chatter
        if name == "airline":
            from aeon.datasets import load_airline
            return np.asarray(load_airline(), dtype=np.float64)
        if name == "lynx":
            from aeon.datasets import load_lynx
            return np.asarray(load_lynx(), dtype=np.float64)
        if name == "shampoo":
            from aeon.datasets import load_shampoo_sales
            return np.asarray(load_shampoo_sales(), dtype=np.float64)
        if name == "solar":
            from aeon.datasets import (
                load_solar,  # reads the CSV inside aeon's wheel (its API call is only a docstring)
            )
            return np.asarray(load_solar(), dtype=np.float64)
        if name == "msft":
            from pmdarima.datasets import load_msft
            return load_msft()["Close"].to_numpy(dtype=np.float64)
        if name == "taylor":
            from pmdarima.datasets import load_taylor
            return np.asarray(load_taylor(), dtype=np.float64)
        if name == "co2":
            import statsmodels.api as sm
            return sm.datasets.co2.load_pandas().data["co2"].to_numpy(dtype=np.float64)
        if name == "sunspots":
            import statsmodels.api as sm
            return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=np.float64)
    raise AssertionError(name)


def forecast_series_names() -> list[str]:
    return list(FORECAST_SOURCES)


def resolve_forecast_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FORECAST_SOURCES:
        raise ValueError(f"unknown forecasting series {name!r}; the series that ship in installed packages are: "
                         f"{', '.join(FORECAST_SOURCES)} (or pass your own with --csv PATH --target COLUMN)")
    return key


def as_series(values, what: str) -> np.ndarray:
    """A user's array as one float64 univariate series: (n,) or (n, 1); anything else is refused, not flattened."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{what} must be numbers, got an array of dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one univariate series of shape (n,) or (n, 1), got shape {arr.shape}")
    return arr.astype(np.float64)


def fill_forward(values: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Carry the last observed value over NaN gaps (causal: nothing from the future). Returns (values, n filled).

    Refuses an all-NaN series and one that starts with NaN (there is no earlier value to carry; trim it)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{what}: expected one univariate series, got shape {values.shape}")
    if np.isinf(values).any():
        raise ValueError(f"{what}: holds infinite values at positions {np.flatnonzero(np.isinf(values))[:5].tolist()}")
    missing = np.isnan(values)
    if missing.all():
        raise ValueError(f"{what}: every value is missing (NaN); nothing to forecast")
    if missing[0]:
        first = int(np.flatnonzero(~missing)[0])
        raise ValueError(f"{what}: the first {first} values are missing; trim the leading gap (no earlier value to "
                         "carry forward)")
    if not missing.any():
        return values, 0
    index = np.where(missing, 0, np.arange(len(values)))
    np.maximum.accumulate(index, out=index)
    return values[index], int(missing.sum())


def load_forecast_series(name: str) -> tuple[np.ndarray, dict]:
    """(values float64 (n,), info) for a named series; info has name, season, description, filled, length."""
    key = resolve_forecast_name(name)
    source = FORECAST_SOURCES[key]
    try:
        raw = _raw_forecast_values(key)
    except ImportError as exc:
        raise ImportError(f"series {key!r} ships with {source.package}, which is not installed: "
                          "pip install 'leanseq[series]'") from exc
    values, filled = fill_forward(raw, key)
    if source.last is not None:
        values = values[-source.last:]
    return values, {"name": key, "season": source.season, "description": source.description,
                    "filled": filled, "length": len(values)}


def load_csv_series(path, target: str) -> tuple[np.ndarray, dict]:
    """One numeric column of a CSV as a series, with clear errors for a missing file/column or non-numeric data."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from exc
    if target not in frame.columns:
        raise ValueError(f"{path}: no column {target!r}; the columns are: {', '.join(map(str, frame.columns))}")
    column = frame[target]
    numeric = pd.to_numeric(column, errors="coerce")
    bad = numeric.isna() & column.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}: column {target!r} is not numeric (row {row + 2} holds {column.iloc[row]!r}); "
                         "pick a numeric --target column")
    values, filled = fill_forward(numeric.to_numpy(dtype=np.float64), f"{path}:{target}")
    return values, {"name": f"{path.stem}:{target}", "season": None, "description": f"column {target} of {path}",
                    "filled": filled, "length": len(values)}


# ---- anomaly series ------------------------------------------------------------------------------------------
ANOMALY_SOURCES = {
    "kdd-tsad-135": "KDD-TSAD 135 (UCR InternalBleeding16 heart rate; aeon load_kdd_tsad_135); normal = its train split",
    "ecg-diff-count-3": "synthetic ECG with 3 anomalies (GutenTAG via TimeEval, CSVs in aeon's wheel); "
                        "normal = its anomaly-free training series",
    "daphnet-s06r02e0": "Daphnet S06R02E0 (aeon load_daphnet_s06r02e0)",
}


def _aeon_unit_test_file(name: str) -> Path:
    import aeon

    path = Path(aeon.__file__).parent / "datasets" / "data" / "UnitTest" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this aeon ({aeon.__version__}) no longer ships ecg-diff-count-3 "
                                "(aeon deprecated it in 1.6); install aeon 1.6 or pick kdd-tsad-135")
    return path


def load_anomaly_series(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(test values (n,), labels (n,) int 0/1, normal training values (m,), info) for a labelled anomaly series.

    Daphnet S06R02E0 is refused: the copy in aeon 1.6 has no positive label, so no ROC-AUC/PR-AUC is defined.
    """
    key = name.strip().lower().replace("_", "-")
    key = {"kdd-tsad135": "kdd-tsad-135", "daphnet": "daphnet-s06r02e0", "ecg": "ecg-diff-count-3"}.get(key, key)
    if key not in ANOMALY_SOURCES:
        raise ValueError(f"unknown anomaly series {name!r}; labelled series that ship in installed packages: "
                         f"kdd-tsad-135, ecg-diff-count-3 (or --csv PATH --target COLUMN --labels COLUMN)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if key == "kdd-tsad-135":
            from aeon.datasets import load_kdd_tsad_135

            values, labels = load_kdd_tsad_135(split="test")
            normal, _ = load_kdd_tsad_135(split="train")
        elif key == "ecg-diff-count-3":
            from aeon.datasets import load_from_timeeval_csv_file

            values, labels = load_from_timeeval_csv_file(_aeon_unit_test_file("ecg-diff-count-3_TEST.csv"))
            normal, normal_labels = load_from_timeeval_csv_file(_aeon_unit_test_file("ecg-diff-count-3_TRAIN_NA.csv"))
            if np.asarray(normal_labels).any():
                raise ValueError("ecg-diff-count-3's normal training series holds labelled anomalies; the file changed")
        else:
            from aeon.datasets import load_daphnet_s06r02e0

            _, labels = load_daphnet_s06r02e0()
            if not np.asarray(labels).any():
                raise ValueError("daphnet-s06r02e0: the copy aeon ships has no positive (anomaly) label in its "
                                 f"{len(labels)} points, so ROC-AUC and PR-AUC are undefined on it; use kdd-tsad-135 "
                                 "or ecg-diff-count-3")
            raise ValueError("daphnet-s06r02e0 is multivariate (9 channels) and has no normal training split; "
                             "use kdd-tsad-135 or ecg-diff-count-3")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    normal = np.asarray(normal, dtype=np.float64).reshape(-1)
    return values, labels, normal, {"name": key, "description": ANOMALY_SOURCES[key], "length": len(values),
                                    "normal_length": len(normal), "anomalous_points": int(labels.sum())}


def load_csv_anomaly_series(path, target: str, labels: str, normal_fraction: float):
    """A CSV with a value column and a 0/1 label column; the first normal_fraction of rows (which must carry no
    positive label) is the normal training data, the rest is scored."""
    import pandas as pd

    values, info = load_csv_series(path, target)
    frame = pd.read_csv(path)
    if labels not in frame.columns:
        raise ValueError(f"{path}: no label column {labels!r}; the columns are: {', '.join(map(str, frame.columns))}")
    marks = pd.to_numeric(frame[labels], errors="coerce").to_numpy()
    if np.isnan(marks).any() or not np.isin(marks, (0, 1)).all():
        raise ValueError(f"{path}: label column {labels!r} must hold only 0 (normal) and 1 (anomaly)")
    cut = int(len(values) * normal_fraction)
    if cut < 16 or len(values) - cut < 16:
        raise ValueError(f"{path}: {len(values)} rows leave too little normal prefix or scored rest at "
                         f"normal fraction {normal_fraction}; need 16 rows on each side")
    if marks[:cut].any():
        raise ValueError(f"{path}: the normal prefix (first {cut} rows) holds anomaly labels; lower --normal-fraction")
    marks = marks.astype(np.int64)
    info.update(normal_length=cut, anomalous_points=int(marks[cut:].sum()), length=len(values) - cut)
    return values[cut:], marks[cut:], values[:cut], info
