"""No state reaches a kernel unchecked: malformed states and hand-edited blobs are refused with an error naming
the tensor, never a crash. Runs with the compiled scan kernel on, where a wrong per-row size once wrote past
its buffers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from leanseq.ops import native
from leanseq.stream import Session, SessionPool, StateBlobError
from leanseq.stream.blob import LAST_LOGITS, STATE_PREFIX

VOCAB = 16
KINDS = ["mamba", "mamba2", "transformer"]
HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def native_kernel():
    """The compiled kernel on (Mamba-1's scan uses it): the path where a bad size corrupted memory."""
    if not native.available() and (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.fail(f"the compiled scan kernel did not build: {native.status()}")
    native.set_enabled(True)
    yield
    native.set_enabled(None)


_models: dict[str, torch.nn.Module] = {}


@pytest.fixture
def models(make_model):
    """One model per family, shared by every hypothesis example (they are only read)."""
    for kind in KINDS:
        if kind not in _models:
            _models[kind] = make_model(kind)
    return _models


def live_state(model, batch_size=2, n=5):
    """A state after n tokens: non-zero values, and a KV cache with free slots."""
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (batch_size, n), generator=torch.Generator().manual_seed(n))
        return model(ids, return_state=True)[1].clone()


# ---- mutations ------------------------------------------------------------------------------------------------
MUTATIONS = ["resize", "extra_layer", "broadcastable", "extra_dim", "drop_dim", "dtype", "nan", "inf",
             "negative_position", "expanded", "missing"]


def mutate(name: str, t: torch.Tensor, how: str, data) -> torch.Tensor | None:
    """A malformed version of state tensor `name`; None means the field is gone."""
    kv_capacity_dim = 3 if name in ("k", "v") else None  # free in size: changing it alone is still valid
    dims = [d for d in range(t.dim()) if d != kv_capacity_dim]
    if how == "resize":
        d = data.draw(st.sampled_from(dims), label="dim")
        size = data.draw(st.integers(1, t.shape[d] + 3).filter(lambda n: n != t.shape[d]), label="size")
        shape = list(t.shape)
        shape[d] = size
        return torch.zeros(shape, dtype=t.dtype)
    if how == "extra_layer":  # one layer (or one row, for the position) too many
        return torch.cat([t, t[:1]], dim=0)
    if how == "broadcastable":  # every per-row size 1: broadcasts against the right shape
        keep = 2 if name != "position" else 1
        shape = list(t.shape[:keep]) + [1] * (t.dim() - keep)
        if tuple(shape) == tuple(t.shape):
            shape = list(t.shape) + [1]
        return torch.zeros(shape, dtype=t.dtype)
    if how == "extra_dim":
        return t.unsqueeze(data.draw(st.integers(0, t.dim()), label="at"))
    if how == "drop_dim":
        return t.sum(dim=data.draw(st.sampled_from(range(t.dim())), label="dim")).to(t.dtype)
    if how == "dtype":
        dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                           torch.int64, torch.bool]).filter(lambda d: d != t.dtype), label="dtype")
        return t.to(dtype)
    if how in ("nan", "inf"):
        out = t.clone().reshape(-1)
        value = {"nan": float("nan"), "inf": data.draw(st.sampled_from([float("inf"), -float("inf")]))}[how]
        out[data.draw(st.integers(0, out.numel() - 1), label="at")] = value
        return out.reshape(t.shape)
    if how == "negative_position":
        out = t.clone()
        out[data.draw(st.integers(0, t.shape[0] - 1), label="row")] = data.draw(st.integers(-(2**40), -1))
        return out
    if how == "expanded":  # the right shape, but every layer one shared memory location
        return t[:1].expand(t.shape)
    if how == "missing":
        return None
    raise AssertionError(how)


def applicable(name: str, t: torch.Tensor, how: str) -> bool:
    if how in ("nan", "inf"):
        return t.is_floating_point()
    if how == "negative_position":
        return name == "position"
    if how == "expanded":
        return name != "position" and t.shape[0] > 1
    return True


@st.composite
def malformed(draw, fields: dict[str, torch.Tensor]):
    name = draw(st.sampled_from(sorted(fields)), label="field")
    how = draw(st.sampled_from([m for m in MUTATIONS if applicable(name, fields[name], m)]), label="mutation")
    return name, how


def assert_refused(exc: BaseException, name: str) -> None:
    assert isinstance(exc, (TypeError, ValueError)), repr(exc)
    assert f"'{name}'" in str(exc), f"the error does not name the tensor {name!r}: {exc}"


# ---- states passed to the model, the session and the pool ---------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@HYPOTHESIS
@given(data=st.data())
def test_malformed_states_are_refused_naming_the_tensor(models, kind, data):
    model = models[kind]
    good = live_state(model)
    fields = good.tensors()
    name, how = data.draw(malformed(fields))
    bad = good.clone()
    setattr(bad, name, mutate(name, fields[name], how, data))
    tokens = torch.tensor([1, 2])
    with torch.no_grad():
        calls = [lambda: model.step(tokens, bad), lambda: model(tokens[:, None].repeat(1, 3), state=bad),
                 lambda: Session(model, batch_size=2, state=bad)]
        for call in calls:
            with pytest.raises((TypeError, ValueError)) as caught:
                call()
            assert_refused(caught.value, name)
        # the pool takes one-row sessions: a valid session whose state was then swapped for a malformed one
        good_row = good.select([0])
        row = Session(model, state=good_row)
        row.state = good_row.clone()
        setattr(row.state, name, mutate(name, getattr(good_row, name), how, data))
        with pytest.raises((TypeError, ValueError)) as caught:
            SessionPool(model).open(session=row)
        assert_refused(caught.value, name)


def test_the_kv_cache_errors_name_the_tensor_at_fault(make_model):
    model = make_model("transformer")
    state = live_state(model)
    bad = state.clone()
    bad.v = bad.v.to(torch.float64)
    with pytest.raises(TypeError, match=r"'v' has dtype torch.float64, expected torch.float32"):
        model.step(torch.tensor([1, 2]), bad)
    bad = state.clone()
    bad.v = bad.v[:, :, :, :-1]
    with pytest.raises(ValueError, match=r"'v' has shape .* but 'k' has"):
        model.step(torch.tensor([1, 2]), bad)
    bad = state.clone()
    bad.position = bad.position + bad.capacity
    with pytest.raises(ValueError, match=r"'position' holds \d+, past the KV cache's capacity"):
        model.step(torch.tensor([1, 2]), bad)


@pytest.mark.parametrize("kind", KINDS)
def test_a_states_skip_of_the_check_is_only_for_the_model_that_returned_it(make_model, kind):
    """check_state skips a state altogether only when this very model returned it and nothing changed since:
    a model with more layers, or this one cast to another dtype, checks it in full and refuses it."""
    model = make_model(kind)
    deeper = make_model(kind, num_hidden_layers=3)
    with torch.no_grad():
        _, state = model.step(torch.tensor([1, 2]), live_state(model))
        assert state._vouched_for(model) and not state._vouched_for(deeper)
        field = "conv" if kind != "transformer" else "k"
        with pytest.raises(ValueError, match=f"state tensor '{field}' has shape"):
            deeper.step(torch.tensor([1, 2]), state)
        model.double()
        with pytest.raises(TypeError, match="dtype"):
            model.step(torch.tensor([1, 2]), state)


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_changed_after_the_model_returned_it_is_checked_again(make_model, kind):
    """The value check is skipped only for the model's own, untouched output; writes and swaps are seen."""
    model = make_model(kind)
    with torch.no_grad():
        _, state = model.step(torch.tensor([1, 2]), live_state(model))
        field = "ssm" if kind != "transformer" else "v"
        getattr(state, field)[0, 1].fill_(float("nan"))  # in place: the version counter moves
        with pytest.raises(ValueError, match=f"'{field}' holds NaN or infinite values"):
            model.step(torch.tensor([1, 2]), state)
        _, state = model.step(torch.tensor([1, 2]), live_state(model))
        setattr(state, field, torch.full_like(getattr(state, field), float("inf")))  # a new tensor
        with pytest.raises(ValueError, match=f"'{field}' holds NaN or infinite values"):
            model.step(torch.tensor([1, 2]), state)


def test_an_absolute_position_state_past_the_position_table_is_refused(make_model):
    model = make_model("transformer", position_embedding="absolute", max_position_embeddings=8)
    state = model.init_state(1, capacity=8)
    state.k = torch.zeros(*state.k.shape[:3], 16, state.k.shape[4])
    state.v = torch.zeros_like(state.k)
    state.position = torch.tensor([12])
    with pytest.raises(ValueError, match="'position' holds 12, past max_position_embeddings=8"):
        model.step(torch.tensor([1]), state)


# ---- hand-edited blobs with a recomputed checksum -----------------------------------------------------------
def reseal(blob: bytes, edit) -> bytes:
    """Rewrite a blob's tensors with edit(dict) and recompute its length field and sha256, as an attacker
    (or a careless editor) would: the checksum then proves nothing."""
    magic, version, header_len = struct.unpack_from("<8sII", blob)
    start = struct.calcsize("<8sII")
    header = json.loads(blob[start : start + header_len])
    tensors = load(blob[start + header_len : -32])
    edit(tensors)
    payload = save(tensors)
    header["payload_len"] = len(payload)
    header_bytes = json.dumps(header, sort_keys=True).encode()
    body = struct.pack("<8sII", magic, version, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


_blobs: dict[str, bytes] = {}


def saved_blob(model, kind) -> bytes:
    if kind not in _blobs:
        session = Session(model, batch_size=2, prefill_chunk_size=3)
        session.push(torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)))
        _blobs[kind] = session.state_bytes()
    return _blobs[kind]


@pytest.mark.parametrize("kind", KINDS)
@HYPOTHESIS
@given(data=st.data())
def test_hand_edited_blobs_are_refused_naming_the_tensor(models, kind, data):
    model = models[kind]
    blob = saved_blob(model, kind)
    tensors = load(blob[struct.calcsize("<8sII") + struct.unpack_from("<8sII", blob)[2] : -32])
    fields = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    fields[LAST_LOGITS] = tensors[LAST_LOGITS]
    # a file holds no views, and a blob without logits (saved before the first token) is valid
    name, how = data.draw(malformed(fields).filter(
        lambda f: f[1] != "expanded" and f != (LAST_LOGITS, "missing")))
    key = name if name == LAST_LOGITS else STATE_PREFIX + name
    new = mutate(name, fields[name], how, data)

    def edit(ts):
        if new is None:
            del ts[key]
        else:
            ts[key] = new.contiguous()

    with pytest.raises(StateBlobError) as caught:
        Session.restore(model, reseal(blob, edit))
    assert (LAST_LOGITS if name == LAST_LOGITS else f"'{name}'") in str(caught.value), str(caught.value)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unedited_resealed_blob_still_restores(models, kind):
    """The resealing above is faithful: without an edit the blob restores and continues."""
    model = models[kind]
    blob = saved_blob(model, kind)
    session = Session.restore(model, reseal(blob, lambda ts: None))
    assert torch.equal(session.push(torch.tensor([1, 2])), Session.restore(model, blob).push(torch.tensor([1, 2])))


# ---- the reported crash, in a child process so a heap corruption cannot take the test run down ---------------
CRASH_SCRIPT = textwrap.dedent("""
    import hashlib, json, struct
    import torch
    from safetensors.torch import load, save
    from leanseq.models.mamba import MambaConfig, MambaLM
    from leanseq.ops import native
    from leanseq.stream import Session

    native.set_enabled(True)
    assert native.available(), native.status()
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=16, hidden_size=64, state_size=16, num_hidden_layers=2)).eval()
    good = model.init_state(1)
    # the right rank and batch, but 1 x 1 per row instead of (intermediate_size, state_size) = (128, 16)
    bad = type(good)(position=good.position, conv=good.conv, ssm=torch.zeros(2, 1, 1, 1))
    for _ in range(20):
        try:
            with torch.no_grad():
                model.step(torch.tensor([1]), bad)
            print("accepted")
        except ValueError as exc:
            print("refused:", exc)
            break
    blob = Session(model).state_bytes()
    start = struct.calcsize("<8sII")
    magic, version, header_len = struct.unpack_from("<8sII", blob)
    header = json.loads(blob[start:start + header_len])
    tensors = load(blob[start + header_len:-32])
    tensors["state.ssm"] = torch.zeros(2, 1, 1, 1)
    payload = save(tensors)
    header["payload_len"] = len(payload)
    head = json.dumps(header, sort_keys=True).encode()
    body = struct.pack("<8sII", magic, version, len(head)) + head + payload
    try:
        session = Session.restore(model, body + hashlib.sha256(body).digest())
        for _ in range(20):
            session.push(1)
        print("restored")
    except ValueError as exc:
        print("refused:", exc)
""")


def test_a_wrong_per_row_state_size_is_refused_before_the_native_kernel_runs(tmp_path):
    if not native.available():
        pytest.skip("no compiled kernel here")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], capture_output=True, text=True, timeout=300, check=False,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"the process died (returncode {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: ") for line in lines), proc.stdout
    assert "'ssm' has shape (2, 1, 1, 1), expected (n_layers, batch, intermediate_size, state_size)" in lines[0]
    assert "'ssm'" in lines[1]
