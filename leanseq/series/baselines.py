"""The methods practitioners run today, in the same process as leanseq's models.

Forecasting: statsforecast's SeasonalNaive, AutoETS and AutoARIMA, each fitted once on the training part and then
updated walk-forward with `model.forward(y[:t], h)` -- statsforecast's documented way (and what its
`cross_validation(refit=False)` does) to apply a fitted model to new observations without re-estimating it: the
model's states are re-filtered over the history seen so far, its parameters stay fixed.

Anomalies: aeon's DWT_MLEAD and KMeansAD (neither needs a package aeon lacks; its matrix-profile detectors STOMP and
LeftSTAMPi need `stumpy`, which leanseq does not install).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

FORECAST_BASELINES = ("SeasonalNaive", "AutoETS", "AutoARIMA")
ANOMALY_BASELINES = ("DWT_MLEAD", "KMeansAD")
ETS_MAX_SEASON = 24  # statsforecast's AutoETS fits a non-seasonal model above this season length
# Above this season we fit a non-seasonal AutoARIMA, as statsforecast's AutoETS does: on this 2-core machine the
# seasonal search took 2-3 minutes on co2 (m=52) and Taylor (m=48) and each walk-forward update 1-4 s (the state
# covariance of a ~150-dimensional seasonal state is rebuilt per update), too slow to stream hundreds of updates.
ARIMA_MAX_SEASON = 24


def make_forecaster(name: str, season: int, train_length: int):
    from statsforecast.models import AutoARIMA, AutoETS, SeasonalNaive

    if name == "SeasonalNaive":
        return SeasonalNaive(season_length=season)
    if name == "AutoETS":
        return AutoETS(season_length=season)
    if name == "AutoARIMA":
        # the exact (non-approximated) likelihood search takes minutes on thousands of points
        approximation = train_length > 1000
        if season > ARIMA_MAX_SEASON:
            return AutoARIMA(season_length=1, seasonal=False, approximation=approximation)
        return AutoARIMA(season_length=season, approximation=approximation)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(FORECAST_BASELINES)}")


def describe_fit(name: str, model, season: int) -> str:
    """Which model statsforecast actually fitted (AutoETS and AutoARIMA choose theirs)."""
    if name == "SeasonalNaive":
        return f"SeasonalNaive(season {season})" if season > 1 else "Naive (season 1)"
    if name == "AutoETS":
        text = str(model.model_["method"])
        if season > ETS_MAX_SEASON and season > 1:
            text += f" (season {season} > {ETS_MAX_SEASON}: statsforecast fits no seasonal ETS)"
        return text
    from statsforecast.arima import arima_string

    text = " ".join(arima_string(model.model_).split())
    if season > ARIMA_MAX_SEASON:
        text += f" (season {season} > {ARIMA_MAX_SEASON}: non-seasonal search, see baselines.ARIMA_MAX_SEASON)"
    return text + (" [approximation]" if model.approximation else "")


def walk_forward(name: str, values: np.ndarray, cut: int, season: int, horizon: int, meter, progress=None) -> dict:
    """Fit on values[:cut]; at every origin t in [cut, n) forecast values[t : t + horizon] from values[:t].

    Returns {"forecasts": (n - cut, horizon), "latencies_s": per update, "fitted": str, "fit_s", "energy"...}.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    model = make_forecaster(name, season, cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model.fit(values[:cut])
        fit_s = time.perf_counter() - start
        model.forward(y=values[:cut], h=horizon)  # numba compiles on first use: keep that out of the timings
        forecasts = np.empty((n - cut, horizon))
        latencies = np.empty(n - cut)
        with meter.measure(label=name) as window:
            for i, t in enumerate(range(cut, n)):
                start = time.perf_counter()
                forecasts[i] = model.forward(y=values[:t], h=horizon)["mean"]
                latencies[i] = time.perf_counter() - start
                if progress is not None:
                    progress.update(1)
    return {"forecasts": forecasts, "latencies_s": latencies, "fitted": describe_fit(name, model, season),
            "fit_s": fit_s, "energy": window.result}


def default_window(normal: np.ndarray) -> int:
    """aeon's dominant-period heuristic (from ClaSP) on the normal data; at least 4 points."""
    from aeon.segmentation._clasp import find_dominant_window_sizes

    return max(4, int(find_dominant_window_sizes(np.asarray(normal, dtype=np.float64))))


def make_detector(name: str, window: int):
    if name == "DWT_MLEAD":
        from aeon.anomaly_detection.series.distribution_based import DWT_MLEAD

        return DWT_MLEAD()
    if name == "KMeansAD":
        from aeon.anomaly_detection.series.distance_based import KMeansAD

        return KMeansAD(window_size=window, random_state=0)
    raise ValueError(f"unknown aeon detector {name!r}; choose from {', '.join(ANOMALY_BASELINES)}")


def detect(name: str, values: np.ndarray, window: int, meter) -> dict:
    """Score every point of `values` with an aeon detector (batch: it sees the whole series at once)."""
    detector = make_detector(name, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with meter.measure(label=name) as w:
            start = time.perf_counter()
            scores = np.asarray(detector.fit_predict(np.asarray(values, dtype=np.float64)), dtype=np.float64)
            seconds = time.perf_counter() - start
    if scores.shape != (len(values),):
        raise RuntimeError(f"{name} returned {scores.shape} scores for {len(values)} points")
    return {"scores": scores, "seconds": seconds, "energy": w.result}
