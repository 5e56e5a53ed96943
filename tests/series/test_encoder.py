"""SeriesModel: real values in, an answer per position out, through every backbone family's state contract."""

from __future__ import annotations

import math

import pytest
import torch

from leanseq.models.checkpoint import CheckpointError
from leanseq.series import SeriesModel, ValueEncoder, gather_last

FAMILIES = ["mamba", "mamba2", "transformer"]


def tiny(family: str, channels: int = 2, out_features: int = 3, task: str = "classify", seed: int = 0):
    model = SeriesModel.build(family, channels=channels, out_features=out_features, task=task, hidden_size=32,
                              num_layers=2, seed=seed)
    return model.eval()


def series(B=3, L=11, C=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, C, generator=g) * 2 + 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_step_by_step_equals_one_forward(family):
    model = tiny(family)
    x = series()
    x[0, 3, 1] = float("nan")  # a missing observation mid-stream takes the same path both ways
    with torch.no_grad():
        whole = model(x)  # (B, L, F)
        state = model.init_state(x.shape[0])
        steps = []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            steps.append(y)
        stepped = torch.stack(steps, dim=1)
        # and in two chunks, the state carried over
        a, s = model(x[:, :5], return_state=True)
        b = model(x[:, 5:], state=s)
    assert whole.shape == (3, 11, 3)
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([a, b], dim=1), whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_session_streams_values(family):
    from leanseq.stream import Session

    model = tiny(family, channels=1, out_features=1, task="regress")
    x = series(B=1, L=9, C=1)
    with torch.no_grad():
        whole = model(x)[0]  # (L, 1)
    session = Session(model)
    first = session.push(x[0, :4])  # (n, C) prefill
    rest = [session.push(float(v)) for v in x[0, 4:, 0]]  # one float at a time
    torch.testing.assert_close(torch.cat([first, torch.stack(rest)]), whole, atol=1e-4, rtol=1e-4)
    assert session.position == 9
    # a saved stream continues exactly, and refuses another model
    blob = session.state_bytes()
    again = Session.restore(model, blob)
    torch.testing.assert_close(again.push(1.5), session.push(1.5))
    with pytest.raises(ValueError, match="another model"):
        Session.restore(tiny(family, channels=1, out_features=1, task="regress", seed=7), blob)


def test_missing_values_are_flagged_not_zero():
    enc = ValueEncoder(1, 8)
    zero = enc(torch.zeros(1, 1, 1))
    missing = enc(torch.full((1, 1, 1), float("nan")))
    assert torch.isfinite(missing).all()
    assert not torch.allclose(zero, missing)  # the indicator tells a missing value from an observed 0


def test_normalizer_is_fitted_on_training_data_and_applied_in_streaming():
    model = tiny("mamba", channels=2)
    train = series(B=4, L=20) * torch.tensor([10.0, 0.1]) + torch.tensor([100.0, -3.0])
    train[0, 0, 0] = float("nan")
    model.fit_normalizer(train)
    observed = train[..., 0][~torch.isnan(train[..., 0])]
    assert math.isclose(float(model.value_mean[0]), float(observed.mean()), rel_tol=1e-5)
    x = train[:2, :6]
    with torch.no_grad():
        whole = model(x)
        state = model.init_state(2)
        last = None
        for t in range(6):
            last, state = model.step(x[:, t], state)
    torch.testing.assert_close(last, whole[:, -1], atol=1e-4, rtol=1e-4)


def test_unequal_lengths_answer_at_each_series_end():
    model = tiny("mamba")
    short, long = series(B=1, L=5), series(B=1, L=9, seed=2)
    padded = torch.cat([torch.cat([short, torch.full((1, 4, 2), float("nan"))], dim=1), long])
    with torch.no_grad():
        out = gather_last(model(padded), torch.tensor([5, 9]))
        alone = torch.cat([model(short)[:, -1], model(long)[:, -1]])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_with_a_clear_error():
    model = tiny("mamba", channels=2)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.zeros(1, 4, 3))
    with pytest.raises(TypeError, match="real numbers"):
        model(torch.zeros(1, 4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="only missing"):
        model(torch.full((2, 4, 2), float("nan")).index_fill_(0, torch.tensor([0]), 1.0))
    with pytest.raises(ValueError, match="infinite"):
        model(torch.tensor([[[1.0, float("inf")]]]))
    with pytest.raises(ValueError, match="values_t"):
        model.step(torch.zeros(1, 4, 2), model.init_state(1))
    with pytest.raises(ValueError, match="unknown family"):
        SeriesModel.build("lstm")
    # integer readings are accepted as values
    assert model(torch.ones(1, 3, 2, dtype=torch.long)).shape == (1, 3, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    model = tiny(family)
    model.fit_normalizer(series(B=2, L=7))
    x = series()
    folder = model.save(tmp_path / "m", metadata={"classes": ["a", "b", "c"]})
    loaded, meta = SeriesModel.load(folder, with_metadata=True)
    assert meta == {"classes": ["a", "b", "c"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.num_parameters() == model.num_parameters() > 0


def test_load_refuses_corrupt_and_mismatched_files(tmp_path):
    import json

    model = tiny("mamba")
    folder = model.save(tmp_path / "m")
    weights = folder / "series.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        SeriesModel.load(folder)
    folder = model.save(tmp_path / "m2")
    cfg = json.loads((folder / "series_config.json").read_text())
    cfg["channels"] = 5
    (folder / "series_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="encoder.proj_in.weight"):
        SeriesModel.load(folder)
    with pytest.raises(CheckpointError, match="series_config.json"):
        SeriesModel.load(tmp_path)
