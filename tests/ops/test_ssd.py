"""The chunked SSD scan and the single-token step against the sequential reference: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from leanseq.ops import ssd_chunked, ssd_reference, ssd_step


def make_inputs(b, l, h, p, g, n, dtype=torch.float32, seed=0, with_state=False):
    """Realistic SSD inputs: dt > 0 (softplus), A < 0, so decays lie in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    x = randn(b, l, h, p)
    dt = F.softplus(randn(b, l, h) - 1.0)
    A = -(torch.rand(h, generator=gen, dtype=dtype) * 3.0 + 0.1)
    B, C = randn(b, l, g, n), randn(b, l, g, n)
    D = randn(h)
    state = randn(b, h, p, n) if with_state else None
    return x, dt, A, B, C, D, state


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    "b,l,h,p,g,n,chunk",
    [
        (1, 16, 2, 4, 1, 3, 4),  # L a multiple of the chunk
        (2, 13, 4, 3, 2, 5, 4),  # L not a multiple, groups > 1, batch > 1
        (3, 7, 6, 2, 3, 4, 16),  # one chunk longer than the sequence
        (2, 9, 4, 5, 4, 2, 1),  # chunk of one token, one head per group
    ],
)
def test_chunked_matches_reference(b, l, h, p, g, n, chunk, with_state):
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n, with_state=with_state)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, s0)
    y, s = ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=chunk)
    assert y.shape == (b, l, h, p) and s.shape == (b, h, p, n)
    assert s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_chunked_without_D_and_long_sequence():
    x, dt, A, B, C, _, _ = make_inputs(2, 70, 4, 4, 2, 8)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=16)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_initial_state_continues_the_sequence():
    """Scanning [0, a) then [a, L) from the first part's state equals one scan over [0, L)."""
    x, dt, A, B, C, D, _ = make_inputs(2, 21, 4, 3, 2, 4)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, D, chunk_size=4)
    a = 10
    y1, s1 = ssd_chunked(x[:, :a], dt[:, :a], A, B[:, :a], C[:, :a], D, chunk_size=4)
    y2, s2 = ssd_chunked(x[:, a:], dt[:, a:], A, B[:, a:], C[:, a:], D, s1, chunk_size=8)
    assert rel_err(torch.cat([y1, y2], 1), y_full) < 1e-5
    assert rel_err(s2, s_full) < 1e-5


def test_step_by_step_matches_reference():
    b, l, h, p, g, n = 2, 9, 4, 3, 2, 5
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n, with_state=True)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, s0)
    state = s0.clone()
    ys = []
    for t in range(l):
        before = state.clone()
        y_t, new_state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert torch.equal(state, before), "ssd_step must not modify the state it is given"
        ys.append(y_t)
        state = new_state
    assert rel_err(torch.stack(ys, 1), y_ref) < 1e-5
    assert rel_err(state, s_ref) < 1e-5


def test_gradients_match_reference():
    x, dt, A, B, C, D, s0 = make_inputs(2, 11, 4, 3, 2, 4, with_state=True)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    cot_y = torch.randn(2, 11, 4, 3)
    cot_s = torch.randn(2, 4, 3, 4)

    def grads(fn, **kw):
        y, s = fn(*leaves, **kw)
        return torch.autograd.grad((y * cot_y).sum() + (s * cot_s).sum(), leaves)

    names = ["x", "dt", "A", "B", "C", "D", "s0"]
    for g_ref, g_chunk, name in zip(grads(ssd_reference), grads(ssd_chunked, chunk_size=4), names):
        assert rel_err(g_chunk, g_ref) < 1e-4, name


def test_gradcheck_float64():
    x, dt, A, B, C, D, s0 = make_inputs(1, 5, 2, 2, 1, 2, dtype=torch.float64, with_state=True)
    leaves = tuple(t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0))
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked(*a, chunk_size=2), leaves)
    assert torch.autograd.gradcheck(lambda *a: ssd_step(a[-1], *(t[:, 0] for t in a[:2]), a[2],
                                                         *(t[:, 0] for t in a[3:5]), a[5]), leaves)


def test_float64_stays_float64_and_low_precision_input_keeps_dtype():
    x, dt, A, B, C, D, _ = make_inputs(1, 6, 2, 2, 1, 2, dtype=torch.float64)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk_size=4)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    x, dt, A, B, C, D, _ = make_inputs(1, 6, 2, 2, 1, 2)
    y16, s16 = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, chunk_size=4)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    y_ref, _ = ssd_reference(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D)
    assert rel_err(y16.float(), y_ref.float()) < 1e-2


def test_no_whole_sequence_quadratic_tensor(monkeypatch):
    """Intermediates stay O(L * chunk): nothing with two sequence-length dimensions is built."""
    l, chunk = 64, 8
    x, dt, A, B, C, D, _ = make_inputs(1, l, 2, 2, 1, 2)
    biggest = []
    real_matmul, real_exp = torch.matmul, torch.exp

    def spy(real):
        def fn(*args, **kwargs):
            out = real(*args, **kwargs)
            biggest.append(out.numel())
            return out
        return fn

    monkeypatch.setattr(torch, "matmul", spy(real_matmul))
    monkeypatch.setattr(torch, "exp", spy(real_exp))
    ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk)
    assert biggest and max(biggest) <= 2 * l * chunk  # heads (2) x L x chunk, never L x L


def test_non_contiguous_inputs():
    """Inputs split out of one projection (as in the model) are strided views; results must not change."""
    b, l, h, p, g, n = 2, 10, 4, 3, 2, 5
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n, with_state=True)
    packed = torch.cat([x.reshape(b, l, h * p), B.reshape(b, l, g * n), C.reshape(b, l, g * n)], dim=-1)
    xs, Bs, Cs = torch.split(packed, [h * p, g * n, g * n], dim=-1)
    xs, Bs, Cs = xs.unflatten(-1, (h, p)), Bs.unflatten(-1, (g, n)), Cs.unflatten(-1, (g, n))
    state_t = s0.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    assert not (xs.is_contiguous() or Bs.is_contiguous() or state_t.is_contiguous())
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, s0)
    y, s = ssd_chunked(xs, dt, A, Bs, Cs, D, state_t, chunk_size=5)  # 10 = 2 chunks: no padding copy
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    y0, s1 = ssd_step(state_t, xs[:, 0], dt[:, 0], A, Bs[:, 0], Cs[:, 0], D)
    y0_ref, s1_ref = ssd_reference(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, s0)
    assert rel_err(y0, y0_ref[:, 0]) < 1e-5 and rel_err(s1, s1_ref) < 1e-5


def test_empty_sequence_returns_initial_state():
    x, dt, A, B, C, D, s0 = make_inputs(2, 0, 2, 2, 1, 3, with_state=True)
    y, s = ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=4)
    assert y.shape == (2, 0, 2, 2) and torch.equal(s, s0)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "x": a["x"][0]}, "x must be"),
        (lambda a: {**a, "dt": a["dt"][:, :-1]}, "dt must be"),
        (lambda a: {**a, "A": a["A"][:-1]}, "A must be"),
        (lambda a: {**a, "C": a["C"][..., :-1]}, "C must have"),
        (lambda a: {**a, "B": a["B"][:, :, :1].expand(-1, -1, 3, -1),
                    "C": a["C"][:, :, :1].expand(-1, -1, 3, -1)}, "multiple of groups"),
        (lambda a: {**a, "initial_state": torch.zeros(2, 4, 3, 9)}, "initial_state must be"),
    ],
)
def test_bad_shapes_are_named(change, match):
    x, dt, A, B, C, D, _ = make_inputs(2, 5, 4, 3, 2, 4)
    args = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": None}
    with pytest.raises(ValueError, match=match):
        ssd_chunked(**change(args), chunk_size=2)
    with pytest.raises(ValueError, match=match):
        ssd_reference(**change(args))


def test_no_grad_and_autograd_paths_agree_and_leave_inputs_untouched():
    """Without autograd the chunked scan reuses its intermediates in place; it must give the values the
    differentiable path gives, and never write into its inputs (fp32 inputs are used without a copy)."""
    x, dt, A, B, C, D, s0 = make_inputs(2, 37, 6, 4, 3, 5, with_state=True)
    inputs = (x, dt, A, B, C, D, s0)
    before = [t.clone() for t in inputs]
    with torch.no_grad():
        y_fast, s_fast = ssd_chunked(*inputs, chunk_size=8)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b)
    leaves = [t.clone().requires_grad_() for t in inputs]
    y_grad, s_grad = ssd_chunked(*leaves, chunk_size=8)
    assert y_grad.requires_grad and s_grad.requires_grad
    torch.testing.assert_close(y_fast, y_grad.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_fast, s_grad.detach(), rtol=1e-6, atol=1e-6)
    y_ref, s_ref = ssd_reference(*inputs)
    assert rel_err(y_fast, y_ref) < 1e-5 and rel_err(s_fast, s_ref) < 1e-5
