"""Small layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn

from leanseq.ops import prefill_native


def filled_unless_meta(t: torch.Tensor, fill) -> torch.Tensor:
    """t filled in place by fill(t), except on the meta device (shapes only), for the same reason as above."""
    if not t.is_meta:
        with torch.no_grad():
            t.copy_(fill(t))
    return t


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised as nn.Embedding does it (so seeded models draw the same numbers) except on meta.

    nn.Embedding's own init calls normal_, which on the meta device (where leanseq.load builds a model before
    comparing it with the checkpoint) runs a Python meta kernel that imports torch._dynamo: seconds per process.
    """
    weight = filled_unless_meta(torch.empty(num_embeddings, dim), lambda t: torch.randn_like(t))
    return nn.Embedding(num_embeddings, dim, _weight=weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Mamba, Mamba-2 and Llama checkpoints expect), weight applied after."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm: x * silu(gate), then RMSNorm within each of `n_groups` groups of channels."""

    def __init__(self, hidden_size: int, n_groups: int = 1, eps: float = 1e-6):
        super().__init__()
        if hidden_size % n_groups:
            raise ValueError(f"hidden size {hidden_size} is not divisible by n_groups={n_groups}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = hidden_size // n_groups
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        # without autograd, on float32 CPU tensors: one compiled pass (leanseq.ops.prefill_native)
        done = prefill_native.try_gated_rmsnorm(x, gate, self.weight, self.group_size, self.eps)
        if done is not None:
            return done
        dtype = x.dtype
        x = x.float()
        if gate is not None:
            x = x * nn.functional.silu(gate.float())
        grouped = x.view(*x.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.view_as(x).to(dtype)
