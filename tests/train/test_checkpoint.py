import pickle
import random

import pytest
import torch

from leanseq.train.checkpoint import MAGIC, TrainCheckpointError, load_train_state, save_train_state


def _state():
    return {
        "step": 7,
        "weights": {"w": torch.arange(6.0).view(2, 3)},
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
    }


def test_round_trip_restores_tensors_and_python_rng_state(tmp_path):
    path = save_train_state(tmp_path / "ck.pt", _state())
    loaded = load_train_state(path)
    assert loaded["step"] == 7
    assert torch.equal(loaded["weights"]["w"], torch.arange(6.0).view(2, 3))
    random.setstate(loaded["rng"]["python"])  # weights_only loading keeps the tuple usable
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_flipped_byte_is_detected(tmp_path):
    path = save_train_state(tmp_path / "ck.pt", _state())
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(TrainCheckpointError, match="corrupt: checksum"):
        load_train_state(path)


def test_truncated_or_foreign_files_are_rejected(tmp_path):
    path = save_train_state(tmp_path / "ck.pt", _state())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TrainCheckpointError, match="corrupt"):
        load_train_state(path)
    path.write_bytes(MAGIC + b"abc")
    with pytest.raises(TrainCheckpointError, match="truncated"):
        load_train_state(path)
    torch.save(_state(), path)
    with pytest.raises(TrainCheckpointError, match="bad header"):
        load_train_state(path)
    with pytest.raises(TrainCheckpointError, match="does not exist"):
        load_train_state(tmp_path / "missing.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = save_train_state(tmp_path / "ck.pt", _state())
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_train_state(path, {"bad": lambda: None})  # cannot be pickled
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
