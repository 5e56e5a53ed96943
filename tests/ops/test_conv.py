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
