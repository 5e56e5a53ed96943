"""Causal depthwise conv1d, over a whole sequence and as one step on a rolling conv state.

Layout is channel-last, (B, L, C), like the linear layers around it. The conv state holds the last
K - 1 inputs, (B, C, K - 1), oldest first, so a sequence can be continued exactly where it stopped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanseq.ops import prefill_native


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, C), weight (C, K), bias (C,), conv_state (B, C, K-1) or None (zeros).

    Returns (y (B, L, C), new conv_state (B, C, K-1)).
    """
    batch, _, channels = x.shape
    k = weight.shape[-1]
    if weight.shape != (channels, k):
        raise ValueError(f"conv weight must be (channels={channels}, kernel), got {tuple(weight.shape)}")
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}")
    length = x.shape[1]
    if activation == "silu":  # without autograd, on float32 CPU tensors: one compiled pass (prefill_native)
        done = prefill_native.try_conv_silu(x, weight, bias, conv_state)
        if done is not None:
            return done
    if conv_state is None:
        conv_state = x.new_zeros(batch, channels, k - 1)
    # channel-last throughout: K shifted multiply-adds over (B, L, C) rows, which on a CPU beats a depthwise
    # Conv1d over (B, C, L) plus the transposes into and out of that layout
    full = torch.cat([conv_state.to(x.dtype).transpose(1, 2), x], dim=1)  # (B, K-1+L, C)
    w = weight.to(x.dtype)
    if bias is None:
        y = full[:, :length] * w[:, 0]
    else:
        y = torch.addcmul(bias.to(x.dtype), full[:, :length], w[:, 0])
    for j in range(1, k):
        y.addcmul_(full[:, j : j + length], w[:, j])  # y is a fresh tensor, so in place is autograd-safe
    new_state = full[:, full.shape[1] - (k - 1):].transpose(1, 2).contiguous()  # (B, C, K-1)
    if activation == "silu":
        needs_grad = torch.is_grad_enabled() and y.requires_grad
        y = F.silu(y, inplace=not needs_grad)
    return y, new_state


def causal_conv1d_step(
    x_t: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x_t (B, C), conv_state (B, C, K-1) -> (y_t (B, C), new conv_state)."""
    window = torch.cat([conv_state.to(x_t.dtype), x_t.unsqueeze(-1)], dim=-1)  # (B, C, K)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return y, window[:, :, 1:]
