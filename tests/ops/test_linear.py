"""leanseq.ops.linear: oneDNN with packed weights for long no-grad inputs, F.linear otherwise."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanseq.ops import linear as fast

pytestmark = pytest.mark.skipif(not fast.available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_on():
    fast.set_enabled(True)
    yield
    fast.set_enabled(None)


def _close(a, b):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear_on_long_inputs(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias)
    x = torch.randn(2, fast.MIN_ROWS, 96)
    with torch.no_grad():
        y = fast.linear(x, lin)
        assert lin in fast._packed  # the oneDNN route was taken
        _close(y, F.linear(x, lin.weight, lin.bias))
    assert y.shape == (2, fast.MIN_ROWS, 200)


def test_weight_changes_are_seen():
    torch.manual_seed(1)
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(fast.MIN_ROWS, 64)
    with torch.no_grad():
        fast.linear(x, lin)
        lin.weight.mul_(2.0)  # in place: the packed copy is stale
        _close(fast.linear(x, lin), x @ lin.weight.t())
        lin.weight = nn.Parameter(torch.randn(48, 64))  # replaced
        _close(fast.linear(x, lin), x @ lin.weight.t())
        fast.release(lin)
        assert lin not in fast._packed


def test_other_cases_are_exactly_the_module():
    torch.manual_seed(2)
    lin = nn.Linear(32, 16)
    long_x = torch.randn(fast.MIN_ROWS, 32)
    short_x = torch.randn(fast.MIN_ROWS - 1, 32)
    with torch.no_grad():
        assert torch.equal(fast.linear(short_x, lin), lin(short_x))  # a decode-sized input
        fast.set_enabled(False)
        assert torch.equal(fast.linear(long_x, lin), lin(long_x))
        fast.set_enabled(True)
        double = nn.Linear(32, 16).double()
        assert torch.equal(fast.linear(long_x.double(), double), double(long_x.double()))
    y = fast.linear(long_x, lin)  # autograd on: the module itself, so training gets gradients
    assert y.grad_fn is not None and torch.equal(y, lin(long_x))
    assert lin not in fast._packed


def test_weights_made_in_inference_mode_take_the_module():
    """An inference tensor has no version counter to see in-place edits by: no packed copy, the module's answer."""
    torch.manual_seed(3)
    with torch.inference_mode():
        lin = nn.Linear(32, 16)
        x = torch.randn(fast.MIN_ROWS, 32)
        assert torch.equal(fast.linear(x, lin), lin(x))
    assert lin not in fast._packed
