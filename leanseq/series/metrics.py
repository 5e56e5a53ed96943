"""Scores for forecasts (MAE, MASE) and anomaly scores (ROC-AUC, PR-AUC), and the latency summary every report
uses."""

from __future__ import annotations

import numpy as np


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.size == 0:
        raise ValueError(f"mae needs two equal, non-empty shapes, got {pred.shape} and {truth.shape}")
    return float(np.mean(np.abs(pred - truth)))


def seasonal_naive_scale(train: np.ndarray, season: int) -> float:
    """In-sample MAE of the seasonal-naive forecast y_t = y_{t-season} on the training part: MASE's denominator."""
    train = np.asarray(train, dtype=np.float64)
    if len(train) <= season:
        raise ValueError(f"the training part ({len(train)} points) must be longer than the season ({season}) to "
                         "scale MASE; train on more of the series or use a shorter season")
    scale = float(np.mean(np.abs(train[season:] - train[:-season])))
    if not scale > 0:
        raise ValueError("the training part is constant at the season's lag, so MASE (scaled by its seasonal-naive "
                         "error) is undefined")
    return scale


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(_labels(labels), np.asarray(scores, dtype=np.float64)))


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (sklearn), point-wise."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(_labels(labels), np.asarray(scores, dtype=np.float64)))


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    if labels.min() == labels.max():
        raise ValueError("the labels hold a single class (no anomaly, or nothing normal): ROC-AUC and PR-AUC are "
                         "undefined; score a series with labelled anomalies")
    return labels


def latency_summary(seconds: list[float] | np.ndarray, window: int | None = None) -> dict:
    """Per-update latency: median over all updates, over the first and the last `window` updates (default 10% of
    them, at least 10, at most a third), and last/first: the flatness figure (1.0 = constant time per update)."""
    s = np.asarray(seconds, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no latencies were recorded")
    k = window or max(10, s.size // 10)
    k = max(1, min(k, s.size // 3))
    first, last = float(np.median(s[:k])), float(np.median(s[-k:]))
    return {"updates": int(s.size), "median_ms": 1e3 * float(np.median(s)), "first_ms": 1e3 * first,
            "last_ms": 1e3 * last, "last_over_first": last / first if first > 0 else float("nan"), "window": k}
