"""leanseq.series.classify and `leanseq series classify`: real data in, an honest report out, bad input refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from leanseq.series.classification import ClassifySettings, SeriesClassifier, classify, shipped_datasets
from leanseq.series.encoder import SeriesModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def two_level_series(n, seed):
    """Class "low" sits around -1, "high" around +1; lengths vary from 8 to 30 (unequal, read natively)."""
    rng = np.random.default_rng(seed)
    labels = np.array(["low", "high"] * (n // 2))
    xs = [rng.normal(-1.0 if lab == "low" else 1.0, 0.3, size=(int(rng.integers(8, 31)), 1)) for lab in labels]
    return xs, labels


def test_classify_arrays_of_unequal_lengths_with_anytime_answers(tmp_path):
    xtr, ytr = two_level_series(24, 0)
    xte, yte = two_level_series(20, 1)
    settings = ClassifySettings(seeds=(0,), baselines=(), quick=True)
    report = classify(arrays=(xtr, ytr, xte, yte), settings=settings, out_dir=tmp_path, progress=False)
    row = report["rows"][0]
    assert row["length_min"] < row["length_max"]  # unequal lengths went in whole
    assert row["ours"]["accuracy_mean"] >= 90.0  # an easy problem: the level separates the classes
    assert set(row["ours"]["anytime_mean"]) == {"0.25", "0.5", "0.75"}
    saved = json.loads((tmp_path / "classify.json").read_text())
    assert saved["rows"][0]["ours"]["anytime_mean"]["0.5"] == row["ours"]["anytime_mean"]["0.5"]
    assert (tmp_path / "classify.png").stat().st_size > 0 and "| arrays |" in (tmp_path / "classify.md").read_text()
    # an ensemble of two banks (one ridge fit each, scores averaged) reads the same series; its size is counted
    report = classify(arrays=(xtr, ytr, xte, yte), settings=dataclasses.replace(settings, bank_members=2),
                      progress=False, write=False)
    two = report["rows"][0]["ours"]
    assert two["accuracy_mean"] >= 90.0 and two["runs"][0]["members"] == 2 and two["bytes"] > row["ours"]["bytes"]
    assert "2 x 512 untrained selective-scan channels" in report["table"]
    with pytest.raises(ValueError, match="bank_members"):
        classify(arrays=(xtr, ytr, xte, yte), settings=dataclasses.replace(settings, bank_members=0), write=False)
    # the raw block (first values + differences) is offered only where length x channels fits the limit
    assert row["ours"]["runs"][0]["raw_steps"] == 0  # off by default
    raw = classify(arrays=(xtr, ytr, xte, yte), settings=dataclasses.replace(settings, bank_raw_limit=64),
                   progress=False, write=False)["rows"][0]["ours"]
    longest = max(len(s) for s in xtr)  # the longest train series
    assert raw["runs"][0]["raw_steps"] == longest and raw["accuracy_mean"] >= 90.0
    assert raw["parameters"] == row["ours"]["parameters"] + 2 * (2 * longest - 1)  # its head columns
    with pytest.raises(ValueError, match="bank_raw_limit"):
        classify(arrays=(xtr, ytr, xte, yte), settings=dataclasses.replace(settings, bank_raw_limit=-1), write=False)


def test_anytime_readout_is_causal_and_streams():
    torch.manual_seed(0)
    model = SeriesClassifier(SeriesModel.build("mamba", channels=2, out_features=3, hidden_size=16, num_layers=1))
    model.eval()
    x = torch.randn(2, 12, 2)
    with torch.no_grad():
        pooled, _ = model(x)
        cut, _ = model(x[:, :6])
        # the answer at 50% of the one pass is what a reader of only the first half would say
        torch.testing.assert_close(pooled[:, 5], cut[:, -1], atol=1e-5, rtol=1e-5)
        stream = model.init_stream(2)
        stepped = torch.stack([model.step(x[:, t], stream) for t in range(12)], dim=1)
    torch.testing.assert_close(stepped, pooled, atol=1e-4, rtol=1e-4)


def test_aeon_dataset_beside_a_baseline_in_one_run(tmp_path):
    settings = ClassifySettings(seeds=(0,), baselines=("rocket",), quick=True)
    report = classify(["ItalyPowerDemand"], settings=settings, out_dir=tmp_path, progress=False)
    row = report["rows"][0]
    rocket = row["baselines"]["rocket"]
    assert 0 <= rocket["accuracy_mean"] <= 100 and rocket["j_per_series_mean"] > 0 and rocket["bytes"] > 0
    assert row["published"]["1-NN DTW"] == 95.5
    assert row["ours"]["parameters"] > 0 and row["ours"]["j_per_series_mean"] > 0
    assert "ItalyPowerDemand" in report["table"] and "1-NN DTW" in report["table"]
    assert "untrained selective-scan channels" in report["table"]  # the default method, named in the report
    assert row["ours"]["parameters"] == row["ours"]["runs"][0]["parameters"]  # the head's: the only trained part
    with pytest.raises(ValueError, match="method"):
        classify(["ItalyPowerDemand"], settings=ClassifySettings(method="rocket", quick=True), progress=False,
                 write=False)


def test_unknown_dataset_lists_what_aeon_ships():
    shipped = shipped_datasets()
    assert {"GunPoint", "JapaneseVowels", "BasicMotions"} <= set(shipped)
    with pytest.raises(ValueError, match="GunPoint") as info:
        classify(["NoSuchSet"], progress=False, write=False)
    assert "NoSuchSet" in str(info.value)


def test_csv_errors_name_the_problem(tmp_path):
    good = tmp_path / "good.csv"
    rows = ["t0,t1,t2,label"] + [f"{i % 2},{i % 2 + 0.5},,{'ab'[i % 2]}" for i in range(12)]
    good.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="no column 'kind'"):
        classify(csv=str(good), target="kind", progress=False, write=False)
    text = tmp_path / "text.csv"
    text.write_text("t0,t1,note,label\n1,2,x,a\n2,3,y,b\n")
    with pytest.raises(ValueError, match="note.*not numeric"):
        classify(csv=str(text), target="label", progress=False, write=False)
    empty = tmp_path / "empty.csv"
    empty.write_text("t0,t1,label\n1,2,a\n,,b\n3,4,b\n")
    with pytest.raises(ValueError, match="row 1.*only missing"):
        classify(csv=str(empty), target="label", progress=False, write=False)
    with pytest.raises(ValueError, match="--target"):
        classify(csv=str(good), progress=False, write=False)


def test_cli_classify_quick(tmp_path, capsys):
    from leanseq.cli import main

    csv = tmp_path / "mine.csv"
    rng = np.random.default_rng(0)
    lines = ["a,b,c,d,e,cls"] + [",".join(f"{v:.3f}" for v in rng.normal(k * 2 - 1, 0.3, 5)) + f",{'yn'[k]}"
                                  for k in [0, 1] * 10]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = main(["series", "classify", "--csv", str(csv), "--target", "cls", "--quick", "--seeds", "1",
               "--no-baselines", "--method", "trained", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| mine |" in printed and "trained by AdamW" in printed  # the earlier, trained method stays available
    assert json.loads((out / "classify.json").read_text())["rows"][0]["dataset"] == "mine"
    assert main(["series", "classify", "NoSuchSet", "--quick", "--out", str(out)]) == 1
    assert "aeon does not ship" in capsys.readouterr().err
