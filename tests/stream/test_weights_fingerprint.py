"""The weights fingerprint of a state blob follows every way of changing a weight, `.data` writes included.

A blob saved before a weight change must be refused by the changed model (StateMismatchError); a model whose
weights are back to the same values (or were only moved, cloned or reloaded) restores it.
"""

from __future__ import annotations

import pytest
import torch

from leanseq.stream import Session, StateMismatchError
from leanseq.stream.blob import weights_hash


def target(model, which: str) -> tuple[list[str], torch.nn.Parameter]:
    """(every state_dict name of the parameter, the parameter): tied weights have two names."""
    tensors = model.state_dict(keep_vars=True)
    if which == "lm_head":
        p = tensors["lm_head.weight"]
    elif which == "norm":
        p = next(t for name, t in tensors.items() if "norm" in name and name.endswith(".weight"))
    else:  # the SSM decay rates, or for a transformer its first attention projection
        p = next(t for name, t in tensors.items() if name.endswith(("A_log", "q_proj.weight")))
    return [name for name, t in tensors.items() if t is p], p


def _load_state_dict(model, names, p):
    sd = model.state_dict()
    for name in names:
        sd[name] = sd[name] * 2 + 1
    model.load_state_dict(sd)


def _optimizer_step(model, names, p):
    opt = torch.optim.SGD([p], lr=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()


def _copy_no_grad(model, names, p):
    with torch.no_grad():
        p.copy_(p * 2 + 1)


def _data_assign_view(model, names, p):
    # the same storage at the same address, every element now reads the first one
    p.data = p.data.as_strided(p.shape, (0,) * p.dim())


CHANGES = {
    "data_fill": lambda model, names, p: p.data.fill_(0.25),
    "data_one_element": lambda model, names, p: p.data.view(-1)[-1].add_(1.0),
    "data_assign": lambda model, names, p: setattr(p, "data", p.data * 2 + 1),
    "data_assign_view": _data_assign_view,
    "copy_no_grad": _copy_no_grad,
    "load_state_dict": _load_state_dict,
    "optimizer_step": _optimizer_step,
    "to_float64": lambda model, names, p: model.to(torch.float64),
}


def _clone_data(model, names, p):
    p.data = p.data.clone()  # new storage, same values


def _scale_and_back(model, names, p):
    p.data.mul_(2.0)
    p.data.div_(2.0)  # exact in binary floating point


def _reload_own_weights(model, names, p):
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})


SAME_WEIGHTS = {
    "data_clone": _clone_data,
    "data_scale_and_back": _scale_and_back,
    "load_own_state_dict": _reload_own_weights,
    "to_float64_and_back": lambda model, names, p: model.to(torch.float64).to(torch.float32),
}


def saved_blob(model, which):
    names, p = target(model, which)
    with torch.no_grad():  # distinct values everywhere, so that every change below changes something
        p.copy_(torch.randn_like(p))
    session = Session(model)
    session.push([1, 2, 3])
    return session, session.state_bytes(), names, p


@pytest.mark.parametrize("which", ["lm_head", "norm", "mixer"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_blob_saved_before_a_weight_change_is_refused(model, which, change):
    _, blob, names, p = saved_blob(model, which)
    CHANGES[change](model, names, p)
    with pytest.raises(StateMismatchError, match="different weights"):
        Session.restore(model, blob)


@pytest.mark.parametrize("change", sorted(SAME_WEIGHTS))
def test_blob_restores_into_the_same_weights(model, change):
    session, blob, names, p = saved_blob(model, "lm_head")
    SAME_WEIGHTS[change](model, names, p)
    assert Session.restore(model, blob).position == session.position


def test_weights_hash_is_unchanged_by_the_rewrite(make_model):
    """The digest is the one earlier releases wrote into blobs, so their saved streams still restore."""
    import hashlib

    model = make_model("mamba")
    digest = hashlib.sha256()
    seen = {}
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if id(t) in seen:
            digest.update(f"alias:{seen[id(t)]}".encode())
            continue
        seen[id(t)] = name
        digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert weights_hash(model) == digest.hexdigest()


def test_weights_on_the_meta_device_are_named(make_model):
    model = make_model("mamba")
    model.backbone.norm_f.to("meta")
    with pytest.raises(ValueError, match="'backbone.norm_f.weight' is on the meta device"):
        weights_hash(model)



def test_a_fingerprint_computed_once_gives_the_same_blobs_and_checks(mamba, make_model):
    """A server fingerprints its frozen model once and passes it: the blobs are the same bytes, restore the same,
    and a blob of other weights is still refused."""
    from leanseq.stream import SessionPool, fingerprint

    session = Session(mamba)
    session.push([1, 2, 3])
    frozen = fingerprint(mamba)
    blob = session.state_bytes(frozen=frozen)
    assert blob == session.state_bytes()
    assert session.state_bytes(include_weights_hash=False, frozen=frozen) == session.state_bytes(False)
    restored = Session.restore(mamba, blob, frozen=frozen)
    assert torch.equal(restored.push(4), session.push(4))
    other = make_model("mamba", seed=1)  # same config, other weights
    with pytest.raises(StateMismatchError, match="different weights"):
        Session.restore(mamba, Session(other).state_bytes(), frozen=frozen)
    with pytest.raises(ValueError, match="weights hash"):
        session.state_bytes(frozen=fingerprint(mamba, include_weights=False))
    with pytest.raises(ValueError, match="another model"):
        session.state_bytes(frozen=fingerprint(make_model("transformer")))
    # a pool row's bytes without building a Session: identical to the Session's, metadata included
    pool = SessionPool(mamba)
    a = pool.open()
    pool.push(a, [5, 6])
    twin = pool.session(a)
    twin.metadata = {"note": "x"}
    assert pool.state_bytes(a, metadata={"note": "x"}, frozen=frozen) == twin.state_bytes()
