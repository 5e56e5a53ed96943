"""The chunked Mamba-1 scan and the one-token update must equal the sequential reference."""

import pytest
import torch

from leanseq.ops import selective_scan_chunked, selective_scan_reference, selective_scan_step


def make_inputs(b=2, length=37, d=6, n=4, dtype=torch.float32, seed=0, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, d, generator=g, dtype=dtype)
    # realistic: delta > 0 (softplus output), A < 0; strong_decay drives exp(delta*A) towards 0
    scale = 5.0 if strong_decay else 0.5
    delta = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g, dtype=dtype)) * scale
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=dtype)) * (20.0 if strong_decay else 1.0)
    B = torch.randn(b, length, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, n, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    z = torch.randn(b, length, d, generator=g, dtype=dtype)
    h0 = torch.randn(b, d, n, generator=g, dtype=dtype)
    return u, delta, A, B, C, D, z, h0


@pytest.mark.parametrize("intra_chunk", ["parallel", "sequential"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(intra_chunk, chunk_size, with_state):
    u, delta, A, B, C, D, z, h0 = make_inputs()
    init = h0 if with_state else None
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D, z, initial_state=init)
    with torch.no_grad():
        y, h = selective_scan_chunked(u, delta, A, B, C, D, z, initial_state=init, chunk_size=chunk_size,
                                      intra_chunk=intra_chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_strong_decay_stays_finite_and_exact():
    # decays of exp(-100) per step would overflow a log-space cumsum; the prefix scan only multiplies decays
    u, delta, A, B, C, D, z, h0 = make_inputs(length=70, strong_decay=True)
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D, z, initial_state=h0)
    y, h = selective_scan_chunked(u, delta, A, B, C, D, z, initial_state=h0, chunk_size=32, intra_chunk="parallel")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intra_chunk", ["parallel", "sequential"])
@pytest.mark.parametrize("loss_on", ["y", "state", "both"])
def test_chunked_gradients_match_reference(intra_chunk, loss_on):
    inputs = [t.clone().requires_grad_(True) for t in make_inputs(length=23)]

    def loss(y, h):
        return {"y": y.square().sum(), "state": (h * h.detach()).sum(), "both": y.square().sum() + h.sum()}[loss_on]

    y, h = selective_scan_chunked(*inputs[:7], initial_state=inputs[7], chunk_size=8, intra_chunk=intra_chunk)
    loss(y, h).backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in inputs]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y, h = selective_scan_reference(*ref_inputs[:7], initial_state=ref_inputs[7])
    loss(y, h).backward()
    for name, g, r in zip(["u", "delta", "A", "B", "C", "D", "z", "h0"], grads, ref_inputs):
        expected = torch.zeros_like(r) if r.grad is None else r.grad
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("intra_chunk", ["parallel", "sequential"])
def test_chunked_gradcheck_float64(intra_chunk):
    inputs = [t.requires_grad_(True) for t in make_inputs(b=2, length=7, d=2, n=3, dtype=torch.float64)]

    def fn(*args):
        return selective_scan_chunked(*args[:7], initial_state=args[7], chunk_size=3, intra_chunk=intra_chunk)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_step_matches_reference_and_is_pure():
    u, delta, A, B, C, D, z, h0 = make_inputs(length=9)
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D, z, initial_state=h0)
    h = h0.clone()
    ys = []
    for t in range(u.shape[1]):
        before = h.clone()
        y_t, h_new = selective_scan_step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], D, z[:, t])
        torch.testing.assert_close(h, before)  # the input state is not modified
        ys.append(y_t)
        h = h_new
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_final_state_does_not_alias_outputs():
    u, delta, A, B, C, D, z, _ = make_inputs()
    with torch.no_grad():
        _, h = selective_scan_chunked(u, delta, A, B, C, D, z, chunk_size=8, intra_chunk="sequential")
        h_copy = h.clone()
        selective_scan_chunked(u, delta, A, B, C, D, z, initial_state=h, chunk_size=8, intra_chunk="sequential")
    torch.testing.assert_close(h, h_copy)


def test_shape_errors_are_named():
    u, delta, A, B, C, _, _, h0 = make_inputs()
    with pytest.raises(ValueError, match="delta must match"):
        selective_scan_chunked(u, delta[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_chunked(u, delta, A[:-1], B, C)
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan_chunked(u, delta, A, B, C, initial_state=h0[:1])
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(u, delta, A, B, C, chunk_size=0)
