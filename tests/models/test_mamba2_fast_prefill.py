"""Mamba-2's no-grad prefill fast path (oneDNN projections, compiled scan, conv and gated norm) against the
eager PyTorch model and against step-by-step decoding."""

import pytest
import torch

from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.ops import linear, native, prefill_native

# head_dim 16: the compiled scan applies; groups > 1; 70 tokens: past linear.MIN_ROWS, last scan chunk short
CONFIG = {"vocab_size": 97, "hidden_size": 32, "expand": 2, "num_heads": 4, "head_dim": 16, "state_size": 16,
          "n_groups": 2, "num_hidden_layers": 2, "chunk_size": 64}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(**CONFIG)).eval()


def _eager(fn, *args, **kwargs):
    """The same call with every fast path off: the PyTorch model as trained."""
    linear.set_enabled(False)
    prefill_native.set_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        linear.set_enabled(None)
        prefill_native.set_enabled(None)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fast_prefill_is_used_and_matches_eager(model):
    if not native.available():
        pytest.skip(f"no compiled kernels here: {native.status()}")
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last, state = model(ids, logits="last", return_state=True)
        last_eager, state_eager = _eager(model, ids, logits="last", return_state=True)
    assert "in use" in prefill_native.status()
    assert _rel(last, last_eager) <= 1e-5
    torch.testing.assert_close(state.ssm, state_eager.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.conv, state_eager.conv, rtol=1e-5, atol=1e-6)


def test_fast_prefill_then_decode_equals_one_forward(model):
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = _eager(model, ids)
        prefix, state = model(ids[:, :70], return_state=True)  # the fast path
        steps = []
        for t in range(70, 80):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert _rel(prefix, full[:, :70]) <= 1e-5
    assert _rel(torch.stack(steps, 1), full[:, 70:]) <= 1e-5


def test_training_forward_keeps_gradients(model):
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    model.train()
    model(ids).logsumexp(-1).mean().backward()
    mixer = model.backbone.layers[0].mixer
    for p in (mixer.in_proj.weight, mixer.out_proj.weight, mixer.conv1d.weight, mixer.A_log, mixer.norm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
