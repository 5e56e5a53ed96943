"""Streaming forecasting: data from installed packages, the recipe's streaming twin, no look-ahead, the baselines
and the report a user reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leanseq.energy import Meter
from leanseq.series import SeriesModel, baselines, forecast, metrics, sources
from leanseq.series import forecasting as fc


def test_named_series_load_from_installed_packages():
    for name, length, season in (("airline", 144, 12), ("lynx", 114, 10), ("shampoo", 36, 12), ("solar", 289, 48),
                                 ("sunspots", 309, 11)):
        values, info = sources.load_forecast_series(name)
        assert values.shape == (length,) and info["season"] == season
        assert np.isfinite(values).all()


def test_co2_gaps_are_carried_forward_and_counted():
    values, info = sources.load_forecast_series("co2")
    assert info["filled"] == 59 and np.isfinite(values).all()


def test_fill_forward_is_causal_and_refuses_what_it_cannot_fill():
    filled, n = sources.fill_forward(np.array([1.0, np.nan, np.nan, 4.0, np.nan]), "x")
    assert n == 3 and filled.tolist() == [1.0, 1.0, 1.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="every value is missing"):
        sources.fill_forward(np.full(5, np.nan), "x")
    with pytest.raises(ValueError, match="first 2 values are missing"):
        sources.fill_forward(np.array([np.nan, np.nan, 3.0]), "x")


def test_unknown_series_lists_the_ones_that_ship():
    with pytest.raises(ValueError, match="airline, lynx, shampoo"):
        sources.load_forecast_series("m4_hourly")


def test_csv_errors_name_the_problem(tmp_path):
    path = tmp_path / "load.csv"
    path.write_text("time,mw,site\n0,1.5,a\n1,2.5,b\n2,,c\n")
    values, info = sources.load_csv_series(path, "mw")
    assert values.tolist() == [1.5, 2.5, 2.5] and info["filled"] == 1
    with pytest.raises(ValueError, match="column 'site' is not numeric"):
        sources.load_csv_series(path, "site")
    with pytest.raises(ValueError, match="no column 'load'.*time, mw, site"):
        sources.load_csv_series(path, "load")
    (tmp_path / "empty.csv").write_text("mw\n\n\n")
    with pytest.raises(ValueError, match="every value is missing|not a readable CSV"):
        sources.load_csv_series(tmp_path / "empty.csv", "mw")
    with pytest.raises(FileNotFoundError):
        sources.load_csv_series(tmp_path / "nope.csv", "mw")


def test_mase_scale_is_the_in_sample_seasonal_naive_error():
    train = np.array([1.0, 2.0, 3.0, 2.0, 4.0, 3.0])
    assert metrics.seasonal_naive_scale(train, 2) == pytest.approx(np.mean([2, 0, 1, 1]))
    with pytest.raises(ValueError, match="longer than the season"):
        metrics.seasonal_naive_scale(train, 6)


def test_streaming_features_equal_the_batch_recipe():
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.normal(size=40)) + 5 * np.sin(np.arange(40))
    batch = fc.make_inputs(values, 6, 3)
    stream = fc.StreamFeatures(6, 3, 1.0)
    rows = np.stack([stream.push(v) for v in values])
    np.testing.assert_allclose(rows, batch, equal_nan=True)


def test_zero_correction_is_seasonal_naive_as_statsforecast_computes_it():
    values, info = sources.load_forecast_series("airline")
    cut, season, horizon = 120, info["season"], 14  # a horizon past one season exercises the wrap-around
    ours = []
    stream = fc.StreamFeatures(season, horizon, 1.0)
    for t, y in enumerate(values[:-1]):
        stream.push(y)
        if t >= cut - 1:
            ours.append(stream.forecast(np.zeros(horizon)))
    theirs = baselines.walk_forward("SeasonalNaive", values, cut, season, horizon, Meter())["forecasts"]
    np.testing.assert_allclose(np.array(ours), theirs)
    # and the batch targets are the corrections over exactly that forecast
    targets = fc.make_targets(values, season, horizon, end=len(values))
    np.testing.assert_allclose(targets[cut - 1, :], values[cut:cut + horizon] - theirs[0])


def test_seasonal_naive_mase_on_airline_matches_the_reference():
    values, _ = sources.load_forecast_series("airline")
    cut = len(values) - round(0.2 * len(values))
    run = baselines.walk_forward("SeasonalNaive", values, cut, 12, 1, Meter())
    mase = metrics.mae(run["forecasts"][:, 0], values[cut:]) / metrics.seasonal_naive_scale(values[:cut], 12)
    assert mase == pytest.approx(1.40, abs=0.01)  # reference: Airline SeasonalNaive 1.40


def test_the_stream_never_looks_ahead():
    """Forecasts made at origins up to t0 do not change when every value after t0 is replaced."""
    torch.manual_seed(0)
    model = SeriesModel.build("mamba", channels=5, out_features=2, task="regress", hidden_size=16, num_layers=1,
                              seed=0).eval()
    rng = np.random.default_rng(1)
    values = np.cumsum(rng.normal(size=60))
    cut, t0 = 40, 50
    a = fc.stream_forecasts(model, values, cut, 4, 2, 1.0, Meter())
    changed = values.copy()
    changed[t0 + 1:] = 1e3
    b = fc.stream_forecasts(model, changed, cut, 4, 2, 1.0, Meter())
    same = t0 - cut + 1  # origins cut .. t0 read values[:t0 + 1] only
    np.testing.assert_array_equal(a["forecasts"][:same], b["forecasts"][:same])
    assert not np.allclose(a["forecasts"][same:], b["forecasts"][same:])
    assert a["latencies_s"].shape == (60,) and (a["latencies_s"] > 0).all()
    # the latency probe times copies: the streams it started from stay where they were
    assert a["probe"]["positions"] == [1, 60] and a["probe"]["first_ms"] > 0


def test_quick_run_writes_the_report(tmp_path):
    results = forecast(["shampoo"], out=tmp_path, quick=True, progress=False, baselines=("SeasonalNaive", "AutoETS"))
    row = results["series"][0]
    assert set(row["methods"]) == {"leanseq-mamba", "leanseq-transformer", "SeasonalNaive", "AutoETS"}
    for m in row["methods"].values():
        assert np.isfinite(m["mase_1"]) and m["mase_1"] > 0
        assert m["latency"]["updates"] > 0 and m["joules_per_update"] >= 0
        assert len(m["forecasts"]) == row["test_length"]
    assert row["methods"]["AutoETS"]["fitted"].startswith("ETS(")
    assert row["methods"]["leanseq-mamba"]["latency"]["updates"] == 36  # every observation, first to last
    saved = json.loads((tmp_path / "forecast.json").read_text())
    assert saved["series"][0]["name"] == "shampoo"
    text = (tmp_path / "forecast.md").read_text()
    assert "leanseq-mamba" in text and "SeasonalNaive" in text and ("estimated" in text or "measured" in text)
    assert (tmp_path / "forecast.png").stat().st_size > 1000


def test_user_arrays_and_bad_settings():
    rng = np.random.default_rng(2)
    values = 10 + np.sin(np.arange(80) / 2) + 0.1 * rng.normal(size=80)
    results = forecast(values=values, season=1, out=None, quick=True, progress=False, compare="",
                       baselines=("SeasonalNaive",))
    assert results["series"][0]["name"] == "values"
    with pytest.raises(ValueError, match="nothing to forecast"):
        forecast(out=None, quick=True)
    with pytest.raises(ValueError, match="unknown baseline"):
        forecast(["airline"], out=None, quick=True, baselines=("Prophet",))
    with pytest.raises(TypeError, match="must be numbers"):
        forecast(values=["a", "b"], out=None, quick=True)
    with pytest.raises(ValueError, match=r"one univariate series .* got shape \(80, 2\)"):
        forecast(values=np.stack([values, values], axis=1), out=None, quick=True)
    with pytest.raises(ValueError, match="too short for season 12"):
        forecast(values=values[:20], season=12, out=None, quick=True, baselines=())
    with pytest.raises(ValueError, match="--target"):
        forecast(csv="x.csv", out=None, quick=True)


def test_cli_runs_and_reports_a_bad_csv_in_one_line(tmp_path, capsys):
    from leanseq.cli import main

    assert main(["series", "forecast", "lynx", "--quick", "--no-progress", "--compare", "none",
                 "--baselines", "SeasonalNaive", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "leanseq-mamba" in out and "SeasonalNaive" in out and (tmp_path / "forecast.md").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("day,sales\nmon,x\ntue,y\n")
    assert main(["series", "forecast", "--csv", str(bad), "--target", "sales", "--quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 'sales' is not numeric" in err[0]
