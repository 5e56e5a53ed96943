"""Streaming anomaly detection: labelled series from installed packages, causal scores, aeon's detectors beside
ours, and the errors a user meets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leanseq.energy import Meter
from leanseq.series import SeriesModel, anomalies, metrics, sources
from leanseq.series import anomaly_detection as ad


def test_labelled_series_ship_with_aeon():
    values, labels, normal, info = sources.load_anomaly_series("KDD-TSAD_135")
    assert values.shape == labels.shape == (7501,) and normal.shape == (1200,)
    assert info["anomalous_points"] == 12 and labels[4187:4199].all()
    values, labels, normal, info = sources.load_anomaly_series("ecg-diff-count-3")
    assert values.shape == (10000,) and info["anomalous_points"] == 300 and normal.shape == (10000,)


def test_daphnet_is_refused_because_aeons_copy_has_no_anomaly():
    with pytest.raises(ValueError, match="no positive .anomaly. label"):
        sources.load_anomaly_series("Daphnet_S06R02E0")
    with pytest.raises(ValueError, match="kdd-tsad-135, ecg-diff-count-3"):
        sources.load_anomaly_series("yahoo-a1")


def test_metrics_refuse_a_single_class():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.pr_auc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) < 0.6
    with pytest.raises(ValueError, match="single class"):
        metrics.roc_auc([0, 0, 0], [0.1, 0.2, 0.3])


def test_scores_are_causal_and_a_spike_scores_high():
    model = SeriesModel.build("mamba", channels=2, out_features=1, task="regress", hidden_size=16, num_layers=1,
                              seed=0).eval()
    values = np.sin(np.arange(120) / 3)
    run = ad.stream_scores(model, values, (0.0, 1.0), 1, Meter())
    spiked = values.copy()
    spiked[100] = 25.0
    run2 = ad.stream_scores(model, spiked, (0.0, 1.0), 1, Meter())
    np.testing.assert_array_equal(run["scores"][:100], run2["scores"][:100])  # nothing before the spike moved
    assert run2["scores"][100] > 10 * run["scores"][100]
    assert run["latencies_s"].shape == (120,)


def test_quick_run_scores_ours_and_aeons_detectors(tmp_path):
    results = anomalies(["kdd-tsad-135"], out=tmp_path, quick=True, progress=False)
    row = results["series"][0]
    assert set(row["methods"]) == {"leanseq-mamba", "DWT_MLEAD", "KMeansAD"}
    for m in row["methods"].values():
        assert 0 <= m["roc_auc"] <= 1 and 0 <= m["pr_auc"] <= 1
        assert m["per_observation_ms"] > 0 and len(m["scores"]) == row["length"]
    assert row["methods"]["leanseq-mamba"]["latency"]["updates"] == row["length"]
    saved = json.loads((tmp_path / "anomalies.json").read_text())
    assert saved["summary"]["per_series"][0]["series"] == "kdd-tsad-135"
    assert "DWT_MLEAD" in (tmp_path / "anomalies.md").read_text()
    assert (tmp_path / "anomalies.png").stat().st_size > 1000


def test_user_arrays_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    normal = np.sin(np.arange(300) / 4) + 0.05 * rng.normal(size=300)
    values = np.sin(np.arange(200) / 4)
    values[150:155] += 3
    labels = np.zeros(200, dtype=int)
    labels[150:155] = 1
    results = anomalies(values=values, labels=labels, normal=normal, out=None, quick=True, progress=False,
                        detectors=())
    assert results["series"][0]["methods"]["leanseq-mamba"]["roc_auc"] > 0.5
    with pytest.raises(ValueError, match="all three of values=, labels= .* and normal="):
        anomalies(values=values, out=None, quick=True)
    with pytest.raises(ValueError, match="single class"):
        anomalies(values=values, labels=np.zeros(200), normal=normal, out=None, quick=True)
    path = tmp_path / "plant.csv"
    path.write_text("temp,alarm\n" + "".join(f"{v},{a}\n" for v, a in zip(np.r_[normal, values], np.r_[0 * normal,
                                                                                                    labels])))
    with pytest.raises(ValueError, match="normal prefix .* holds anomaly labels"):
        anomalies(csv=path, target="temp", labels_column="alarm", normal_fraction=0.95, out=None, quick=True)
    with pytest.raises(ValueError, match="--labels COLUMN"):
        anomalies(csv=path, target="temp", out=None, quick=True)
    with pytest.raises(ValueError, match="unknown aeon detector"):
        anomalies(["kdd-tsad-135"], out=None, quick=True, detectors=("STOMP",))


def test_cli_refuses_daphnet_in_one_line(capsys):
    from leanseq.cli import main

    assert main(["series", "anomalies", "daphnet", "--quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leanseq series anomalies: error:") and "no positive" in err[0]
