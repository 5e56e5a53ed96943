"""Causal depthwise conv: a split sequence and single steps must equal one pass, and equal torch's Conv1d."""

import torch

from leanseq.ops import causal_conv1d, causal_conv1d_step


def test_conv_equals_padded_torch_conv1d():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 11, 5), torch.randn(5, 4), torch.randn(5)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], b, padding=3, groups=5)[..., :11]
    y, _ = causal_conv1d(x, w, b, activation=None)
    torch.testing.assert_close(y, ref.transpose(1, 2))


def test_conv_continues_from_state_and_steps():
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 13, 4), torch.randn(4, 4), torch.randn(4)
    full, state_full = causal_conv1d(x, w, b)
    parts, state = [], None
    for lo, hi in [(0, 2), (2, 3), (3, 9), (9, 13)]:  # pieces shorter than the kernel too
        y, state = causal_conv1d(x[:, lo:hi], w, b, conv_state=state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), full)
    torch.testing.assert_close(state, state_full)
    state = torch.zeros(3, 4, 3)
    steps = []
    for t in range(13):
        y, state = causal_conv1d_step(x[:, t], state, w, b)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), full)
    torch.testing.assert_close(state, state_full)


def test_conv_gradients_equal_torch_conv1d_and_no_bias_and_short_inputs():
    torch.manual_seed(2)
    for length, bias in [(9, True), (2, False), (1, True)]:  # shorter than the kernel's state too
        x = torch.randn(2, length, 6, requires_grad=True)
        w = torch.randn(6, 4, requires_grad=True)
        b = torch.randn(6, requires_grad=True) if bias else None
        s0 = torch.randn(2, 6, 3, requires_grad=True)
        y, s = causal_conv1d(x, w, b, conv_state=s0)
        full = torch.cat([s0, x.transpose(1, 2)], -1)
        ref = torch.nn.functional.silu(torch.nn.functional.conv1d(full, w[:, None], b, groups=6)).transpose(1, 2)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(s, full[..., -3:])
        leaves = [t for t in (x, w, b, s0) if t is not None]
        cot = torch.randn_like(y)
        got = torch.autograd.grad((y * cot).sum() + s.sum(), leaves)
        want = torch.autograd.grad((ref * cot).sum() + full[..., -3:].sum(), leaves)
        for g_got, g_want in zip(got, want):
            torch.testing.assert_close(g_got, g_want)
