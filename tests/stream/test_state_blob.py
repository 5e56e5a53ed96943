"""Saving and restoring a stream: exact continuation, and every kind of bad blob refused with a clear error."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from leanseq.stream import FORMAT_VERSION, Session, StateBlobError, StateMismatchError
from leanseq.stream.blob import MAGIC

VOCAB = 16


def prompt(seed=0, n=23):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def with_checksum(body: bytes) -> bytes:
    """A blob body re-sealed with a valid checksum, to reach the checks that come after it."""
    return body + hashlib.sha256(body).digest()


@pytest.fixture
def saved(mamba):
    session = Session(mamba, prefill_chunk_size=5)
    session.push(prompt())
    return session, session.state_bytes()


def test_restore_continues_bit_identically(model):
    original = Session(model, prefill_chunk_size=5)
    original.push(prompt())
    blob = original.state_bytes()
    restored = Session.restore(model, blob)
    assert restored.position == original.position == 23
    assert restored.prefill_chunk_size == 5
    assert restored.predict() == original.predict()
    more = prompt(1, 9)
    for token in more[:4]:  # single steps
        assert torch.equal(restored.push(int(token)), original.push(int(token)))
    assert torch.equal(restored.push(more[4:]), original.push(more[4:]))  # a prefill
    assert restored.state_bytes() == original.state_bytes()  # the states are the same bytes again


def test_restore_of_a_fresh_and_a_batched_session(model):
    fresh = Session.restore(model, Session(model).state_bytes())
    assert fresh.position == 0 and fresh.last_logits is None
    batched = Session(model, batch_size=2, prefill_chunk_size=3)
    x = torch.stack([prompt(2, 7), prompt(3, 7)])
    batched.push(x)
    again = Session.restore(model, batched.state_bytes())
    assert again.batch_size == 2
    assert torch.equal(again.push(x), batched.push(x))


def test_save_and_load_file(tmp_path, saved, mamba):
    session, _ = saved
    path = tmp_path / "streams" / "a.lsqstate"
    session.save(path)
    session.push(3)
    session.save(path)  # overwrite in place: atomic replace, no temp file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.lsqstate"]
    loaded = Session.load(mamba, path)
    assert loaded.position == session.position == 24
    assert torch.equal(loaded.push(7), session.push(7))


def test_failed_save_keeps_the_old_file(tmp_path, saved, mamba, monkeypatch):
    session, blob = saved
    path = tmp_path / "a.lsqstate"
    session.save(path)
    session.push(4)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("leanseq.stream.blob.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        session.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == blob  # the old state, whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.lsqstate"]  # no temp file left behind
    assert Session.load(mamba, path).position == 23


def test_load_names_the_file_on_error(tmp_path, saved, mamba):
    _, blob = saved
    path = tmp_path / "bad.lsqstate"
    path.write_bytes(blob[:-10])
    with pytest.raises(StateBlobError, match=r"bad\.lsqstate: state blob is truncated"):
        Session.load(mamba, path)
    with pytest.raises(FileNotFoundError, match="no saved stream state"):
        Session.load(mamba, tmp_path / "missing.lsqstate")


def test_blob_of_another_model_type_is_refused(saved, make_model):
    _, blob = saved
    with pytest.raises(StateMismatchError, match="saved for model_type 'mamba', this model is 'mamba2'"):
        Session.restore(make_model("mamba2"), blob)


def test_blob_of_another_config_is_refused(saved, make_model):
    _, blob = saved
    with pytest.raises(StateMismatchError, match="different config"):
        Session.restore(make_model("mamba", state_size=8), blob)


def test_blob_of_other_weights_is_refused_unless_asked(saved, make_model):
    session, blob = saved
    other = make_model("mamba", seed=1)  # same config, other weights
    with pytest.raises(StateMismatchError, match="different weights"):
        Session.restore(other, blob)
    restored = Session.restore(other, blob, check_weights=False)
    assert restored.position == session.position
    no_hash = session.state_bytes(include_weights_hash=False)
    assert Session.restore(other, no_hash).position == session.position


def test_weights_changed_in_place_change_the_fingerprint(mamba):
    session = Session(mamba)
    session.push([1, 2, 3])
    blob = session.state_bytes()
    with torch.no_grad():
        mamba.lm_head.weight[0, 0] += 1.0  # the cached hash must notice an in-place edit
    with pytest.raises(StateMismatchError, match="different weights"):
        Session.restore(mamba, blob)


@pytest.mark.parametrize("cut", [0, 4, 10, 16, 40, -33, -1])
def test_truncated_blob_is_refused(saved, mamba, cut):
    _, blob = saved
    with pytest.raises(StateBlobError, match="truncated"):
        Session.restore(mamba, blob[:cut])


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_corrupt_blob_is_refused(saved, mamba, where):
    _, blob = saved
    header_len = struct.unpack_from("<I", blob, 12)[0]
    offset = {"header": 16 + header_len // 2, "payload": len(blob) - 100, "checksum": len(blob) - 5}[where]
    corrupt = bytearray(blob)
    corrupt[offset] ^= 0x01
    with pytest.raises(StateBlobError, match="corrupt"):
        Session.restore(mamba, bytes(corrupt))


def test_trailing_bytes_are_refused(saved, mamba):
    _, blob = saved
    with pytest.raises(StateBlobError, match="corrupt: 3 unexpected bytes"):
        Session.restore(mamba, blob + b"abc")


def test_other_version_is_refused(saved, mamba):
    _, blob = saved
    body = bytearray(blob[:-32])
    struct.pack_into("<I", body, 8, FORMAT_VERSION + 1)
    with pytest.raises(StateBlobError, match=f"format version {FORMAT_VERSION + 1} \\(written by a newer leanseq\\)"):
        Session.restore(mamba, with_checksum(bytes(body)))


def test_not_a_state_blob_is_refused(mamba, tmp_path):
    with pytest.raises(StateBlobError, match="not a leanseq stream state"):
        Session.restore(mamba, b"PK\x03\x04 a zip file, not a state" + bytes(64))
    with pytest.raises(TypeError, match="bytes"):
        Session.restore(mamba, "a string")


def test_tensors_that_do_not_fit_the_model_are_refused(mamba):
    """A well-sealed blob whose payload is not this model's state (caught after the checksum)."""
    from safetensors.torch import save

    good = Session(mamba).state_bytes()
    header_len = struct.unpack_from("<I", good, 12)[0]
    import json

    header = json.loads(good[16 : 16 + header_len])
    payload = save({"state.position": torch.zeros(1, dtype=torch.long), "state.conv": torch.zeros(2, 1, 3)})
    header["payload_len"] = len(payload)
    header_bytes = json.dumps(header).encode()
    body = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header_bytes)) + header_bytes + payload
    with pytest.raises(StateBlobError, match="does not hold a MambaState"):
        Session.restore(mamba, with_checksum(body))


def test_blob_holds_no_pickle(saved):
    """The payload is plain safetensors: readable by safetensors' own loader, no pickle opcodes needed."""
    from safetensors.torch import load

    _, blob = saved
    header_len = struct.unpack_from("<I", blob, 12)[0]
    tensors = load(blob[16 + header_len : -32])
    assert {"state.position", "state.conv", "state.ssm", "last_logits"} == set(tensors)


def test_tensor_payload_is_safetensors_torch_bytes_for_every_dtype():
    """Blobs write their tensors through safetensors.numpy where the dtype allows (cheaper per call): the bytes
    must be exactly what safetensors.torch writes, so blobs from either path are one format; bfloat16 takes
    the torch path."""
    from safetensors.torch import load, save

    from leanseq.stream.blob import save_tensors

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bfloat16):
        values = torch.randn(2, 3, 5, generator=g) * 100
        tensors = {"state.ssm": values.to(dtype), "state.position": torch.tensor([7, 9]),
                   "last_logits": torch.randn(1, 4, generator=g), "state.empty": torch.zeros(0, 3, dtype=dtype)}
        assert save_tensors(tensors) == save(tensors), dtype
        assert all(torch.equal(load(save_tensors(tensors))[k], t) for k, t in tensors.items())
