"""The compiled no-grad prefill kernels (leanseq.ops.prefill_native) against the PyTorch code they replace.

The ops conftest runs each test twice: "native" (compiled kernels allowed) and "torch" (LEANSEQ_NATIVE off),
where the same calls must take the PyTorch path.
"""

import pytest
import torch
import torch.nn.functional as F

from leanseq.models.layers import GatedRMSNorm
from leanseq.ops import causal_conv1d, prefill_native, ssd_chunked, ssd_reference


def _torch_only(fn, *args, **kwargs):
    prefill_native.set_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        prefill_native.set_enabled(None)


def _ssd_inputs(b, l, h, p, g, n, seed=0, with_state=False):
    """x, B and C as views into one wider conv output, as the Mamba-2 mixer passes them."""
    gen = torch.Generator().manual_seed(seed)
    xbc = torch.randn(b, l, h * p + 2 * g * n + 8, generator=gen)
    x = xbc[..., : h * p].view(b, l, h, p)
    B = xbc[..., h * p : h * p + g * n].view(b, l, g, n)
    C = xbc[..., h * p + g * n : h * p + 2 * g * n].view(b, l, g, n)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1.0)
    A = -(torch.rand(h, generator=gen) * 3.0 + 0.1)
    D = torch.randn(h, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen) if with_state else None
    return x, dt, A, B, C, D, state


def _close(a, b, rtol=2e-5):
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= rtol * scale, f"max |diff| {(a - b).abs().max().item():.3g} (scale {scale.item():.3g})"


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    "b,l,h,p,g,n,chunk",
    [
        (1, 130, 4, 64, 1, 32, 64),  # the usual head_dim; last chunk short
        (2, 37, 4, 32, 2, 16, 8),  # batch > 1, groups > 1
        (1, 5, 2, 80, 1, 3, 64),  # head_dim not a multiple of 64; one chunk longer than the sequence
    ],
)
def test_ssd_kernel_matches_pytorch_chunked_and_reference(scan_backend, b, l, h, p, g, n, chunk, with_state):
    x, dt, A, B, C, D, s0 = _ssd_inputs(b, l, h, p, g, n, with_state=with_state)
    with torch.no_grad():
        used = prefill_native.try_ssd(x, dt, A, B, C, D, s0, chunk)
        y, state = ssd_chunked(x, dt, A, B, C, D, initial_state=s0, chunk_size=chunk)
        y_torch, state_torch = _torch_only(ssd_chunked, x, dt, A, B, C, D, initial_state=s0, chunk_size=chunk)
        y_ref, state_ref = ssd_reference(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                                         None if s0 is None else s0.double())
    assert (used is not None) == (scan_backend == "native")
    _close(y, y_torch)
    _close(state, state_torch)
    _close(y, y_ref.float())
    _close(state, state_ref.float())
    if s0 is not None:
        assert s0.data_ptr() != state.data_ptr()  # the initial state is read, not overwritten


def test_ssd_with_gradients_keeps_the_autograd_path():
    x, dt, A, B, C, D, _ = _ssd_inputs(1, 20, 2, 16, 1, 4)
    x = x.clone().requires_grad_(True)
    prefill_native.set_enabled(True)
    try:
        assert prefill_native.try_ssd(x, dt, A, B, C, D, None, 8) is None
        y, _ = ssd_chunked(x, dt, A, B, C, D, chunk_size=8)
    finally:
        prefill_native.set_enabled(None)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("b,l,c,k,with_state,bias", [
    (1, 70, 48, 4, False, True),
    (2, 2, 40, 4, True, True),  # fewer tokens than the kernel's history: the new state keeps old columns
    (2, 9, 33, 3, True, False),
])
def test_conv_silu_kernel_matches_pytorch(scan_backend, b, l, c, k, with_state, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, l, c + 20, generator=gen)[..., 5 : 5 + c]  # a strided view, as in the mixers
    w = torch.randn(c, k, generator=gen)
    bb = torch.randn(c, generator=gen) if bias else None
    st = torch.randn(b, c, k - 1, generator=gen) if with_state else None
    with torch.no_grad():
        assert (prefill_native.try_conv_silu(x, w, bb, st) is not None) == (scan_backend == "native")
        y, new_state = causal_conv1d(x, w, bb, st)
        y_torch, state_torch = _torch_only(causal_conv1d, x, w, bb, st)
    _close(y, y_torch)
    assert torch.equal(new_state, state_torch)


@pytest.mark.parametrize("b,l,d,groups", [(1, 40, 128, 1), (2, 7, 64, 4)])
def test_gated_rmsnorm_kernel_matches_pytorch(scan_backend, b, l, d, groups):
    gen = torch.Generator().manual_seed(2)
    norm = GatedRMSNorm(d, n_groups=groups, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen))
        y = torch.randn(b, l, d, generator=gen)
        z = torch.randn(b, l, 3 * d, generator=gen)[..., d : 2 * d]  # the gate is a view into in_proj's output
        assert (prefill_native.try_gated_rmsnorm(y, z, norm.weight, norm.group_size, norm.eps) is not None) == (
            scan_backend == "native")
        out = norm(y, z)
        out_torch = _torch_only(norm, y, z)
    _close(out, out_torch)
    out_grad = norm(y, z)  # with autograd on, the PyTorch path: the weight gets a gradient
    out_grad.sum().backward()
    assert norm.weight.grad is not None


def test_broadcast_inputs_are_read_as_pytorch_reads_them(scan_backend):
    """Inputs broadcast over tokens or rows (stride 0) work as on the PyTorch path, never a kernel refusal:
    B and C of the scan, the conv's input, the norm's gate."""
    gen = torch.Generator().manual_seed(3)
    b, l, h, p, g, n = 2, 24, 2, 16, 1, 8
    x, dt, A, _, _, D, _ = _ssd_inputs(b, l, h, p, g, n, seed=3)
    B = torch.randn(g, n, generator=gen).expand(b, l, g, n)
    C = torch.randn(g, n, generator=gen).expand(b, l, g, n)
    conv_x = torch.randn(1, 1, 32, generator=gen).expand(b, l, 32)
    w, bias = torch.randn(32, 4, generator=gen), torch.randn(32, generator=gen)
    norm = GatedRMSNorm(64, n_groups=2, eps=1e-5)
    y, gate = torch.randn(4, 64, generator=gen), torch.randn(64, generator=gen).expand(4, 64)
    with torch.no_grad():
        got, got_state = ssd_chunked(x, dt, A, B, C, D=D, chunk_size=8)
        want, want_state = _torch_only(ssd_chunked, x, dt, A, B, C, D=D, chunk_size=8)
        _close(got, want)
        _close(got_state, want_state)
        got, got_state = causal_conv1d(conv_x, w, bias)
        want, want_state = _torch_only(causal_conv1d, conv_x, w, bias)
        _close(got, want)
        assert torch.equal(got_state, want_state)
        _close(norm(y, gate), _torch_only(norm, y, gate))
