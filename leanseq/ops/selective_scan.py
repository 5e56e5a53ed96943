"""Mamba-1 selective scan: a sequential reference, a chunked fast path, and a one-token update.

Shapes (channel-last, like the linear layers around the scan):
    u, delta, z: (B, L, D)      A: (D, N), negative      B, C: (B, L, N)      D: (D,)
    state: (B, D, N) float32    y: (B, L, D)

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (per channel d and state index n)
    y_t = <h_t, C_t> + D * u_t,   then y_t * silu(z_t) when z is given

`delta` is the discretisation step already made positive by the caller (softplus(dt + bias)).
Every full-sequence function takes an initial state and returns the final one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanseq.ops import native
from leanseq.ops.export_mode import is_exporting


def _check(u, delta, A, B, C, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, length, channels), got {tuple(u.shape)}")
    b, length, d = u.shape
    n = A.shape[-1]
    if delta.shape != u.shape:
        raise ValueError(f"delta must match u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.shape != (d, n):
        raise ValueError(f"A must be (channels={d}, state), got {tuple(A.shape)}")
    if B.shape != (b, length, n) or C.shape != (b, length, n):
        raise ValueError(f"B and C must be (batch, length, state)=({b}, {length}, {n}); got {tuple(B.shape)}, {tuple(C.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"initial_state must be ({b}, {d}, {n}), got {tuple(initial_state.shape)}")


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: float32 for half/bf16/fp32 inputs, float64 kept (for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _finish(y, u, D, z):
    """Skip connection and gate, shared by every scan variant."""
    if D is not None:
        y = y + _acc(u) * _acc(D)
    if z is not None:
        y = y * F.silu(_acc(z))
    return y.to(u.dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, initial_state=None):
    """The readable definition: one time step at a time, float32 state. Returns (y, final_state)."""
    _check(u, delta, A, B, C, initial_state)
    b, length, d = u.shape
    A, uf, df, Bf, Cf = _acc(A), _acc(u), _acc(delta), _acc(B), _acc(C)
    h = uf.new_zeros(b, d, A.shape[-1]) if initial_state is None else _acc(initial_state)
    ys = []
    for t in range(length):
        dA = torch.exp(df[:, t, :, None] * A)  # (B, D, N)
        dBu = (df[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]  # (B, D, N)
        h = dA * h + dBu
        ys.append((h * Cf[:, t, None, :]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(b, 0, d)
    return _finish(y, u, D, z), h


def _prefix_scan(dA: torch.Tensor, dBu: torch.Tensor):
    """Inclusive parallel prefix (Hillis-Steele) of h_t = a_t h_{t-1} + x_t along dim 1 in log2(T) steps.

    Returns (cumulative decay P_t, local state X_t) so that h_t = P_t * h_0 + X_t. Only products of decays
    (each <= 1) are formed, so nothing overflows however strong the decay, unlike a cumsum in log space.
    """
    length = dA.shape[1]
    k = 1
    while k < length:
        dBu = torch.cat([dBu[:, :k], torch.addcmul(dBu[:, k:], dA[:, k:], dBu[:, :-k])], dim=1)
        dA = torch.cat([dA[:, :k], dA[:, k:] * dA[:, :-k]], dim=1)
        k *= 2
    return dA, dBu


def _discretize(u, delta, A, B, sl):
    """One chunk's decays and inputs: (exp(delta A), delta u B), each (B, T, D, N)."""
    dt = _acc(delta[:, sl])  # (B, T, D)
    dA = torch.exp(dt[..., None] * A)
    dBu = (dt * _acc(u[:, sl]))[..., None] * _acc(B[:, sl, None, :])
    return dt, dA, dBu


def _loop_scan(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t along dim 1, in place into one buffer: each step reads and writes only a
    cache-resident (B, D, N) slice, which on a CPU beats any vectorised formulation. reverse=True runs
    from the last step to the first (the adjoint recurrence of the backward pass)."""
    out = torch.empty_like(x)
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in steps:
        h = torch.addcmul(x[:, t], a[:, t], h, out=out[:, t])
    return out


class _SequentialChunkScan(torch.autograd.Function):
    """Chunked scan with an in-place loop inside each chunk and a hand-written backward.

    Forward keeps only each chunk's start state. Backward walks the chunks in reverse, recomputes a chunk's
    states from its start state, runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} and turns it
    into gradients for u, delta, A, B, C and the initial state. Peak memory stays one chunk of (B, T, D, N).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk_size):
        A_dtype, A = A.dtype, _acc(A)
        if native.supports(u, delta, A, B, C, h0):
            y, h, start_states = native.selective_scan_fwd(u, delta, A, B, C, h=h0, chunk=chunk_size)
            ctx.save_for_backward(u, delta, A, B, C, *start_states.unbind(1))
            ctx.chunk_size, ctx.A_dtype = chunk_size, A_dtype
            return y, h
        starts = []
        ys = []
        h = h0
        for start in range(0, u.shape[1], chunk_size):
            sl = slice(start, start + chunk_size)
            starts.append(h)
            _, dA, dBu = _discretize(u, delta, A, B, sl)
            H = _loop_scan(dA, dBu, h)  # (B, T, D, N)
            h = H[:, -1].clone()
            ys.append(torch.einsum("btdn,btn->btd", H, _acc(C[:, sl])))
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.chunk_size = chunk_size
        ctx.A_dtype = A_dtype
        y = torch.cat(ys, dim=1) if ys else A.new_zeros(u.shape[0], 0, u.shape[2])
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        q = ctx.chunk_size
        if native.supports(u, delta, A, B, C, starts[0]):
            gy = torch.zeros_like(u) if grad_y is None else grad_y.float()
            du, ddelta, dA_param, dB, dC, dh0 = native.selective_scan_bwd(
                u, delta, A, B, C, torch.stack(starts, 1), gy, grad_h, q
            )
            return du, ddelta, dA_param.to(ctx.A_dtype), dB, dC, dh0, None
        g = torch.zeros_like(starts[0]) if grad_h is None else _acc(grad_h)  # dL/dh flowing in from the future
        grad_y = torch.zeros(u.shape, dtype=A.dtype, device=u.device) if grad_y is None else _acc(grad_y)
        du, ddelta = torch.empty_like(_acc(u)), torch.empty_like(_acc(delta))
        dB, dC = torch.empty_like(_acc(B)), torch.empty_like(_acc(C))
        dA_param = torch.zeros_like(A)
        for idx in range(len(starts) - 1, -1, -1):
            sl = slice(idx * q, idx * q + q)
            dt, dA, dBu = _discretize(u, delta, A, B, sl)
            H = _loop_scan(dA, dBu, starts[idx])  # recomputed states of this chunk
            dy = grad_y[:, sl]  # (B, T, D)
            Cs = _acc(C[:, sl])
            # adjoint: G_t = C_t dy_t + a_{t+1} G_{t+1}, and G after the last step is g (from later chunks)
            a_next = torch.cat([dA[:, 1:], torch.ones_like(dA[:, :1])], dim=1)
            G = _loop_scan(a_next, dy[..., None] * Cs[:, :, None, :], g, reverse=True)  # (B, T, D, N)
            H_prev = torch.cat([starts[idx][:, None], H[:, :-1]], dim=1)
            dC[:, sl] = torch.einsum("btdn,btd->btn", H, dy)
            g_a = G * H_prev * dA  # dL/d(delta A) per (t, d, n)
            dA_param += torch.einsum("btdn,btd->dn", g_a, dt)
            d_du = torch.einsum("btdn,btn->btd", G, _acc(B[:, sl]))  # dL/d(delta u)
            uc = _acc(u[:, sl])
            ddelta[:, sl] = torch.einsum("btdn,dn->btd", g_a, A) + d_du * uc
            du[:, sl] = d_du * dt
            dB[:, sl] = torch.einsum("btdn,btd->btn", G, dt * uc)
            g = G[:, 0] * dA[:, 0]  # dL/dh before this chunk
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA_param.to(ctx.A_dtype), dB.to(B.dtype), dC.to(C.dtype),
                g, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, initial_state=None, chunk_size=64, intra_chunk="auto"):
    """The fast path: the sequence in chunks, state passed from chunk to chunk.

    Only one chunk's (B, T, D, N) tensors exist at a time, never the whole (B, L, D, N). Inside a chunk the
    recurrence runs either as a parallel prefix scan (log2 T vectorised steps; suits GPUs) or as a tight
    in-place loop with a hand-written, recomputing backward (fastest on a CPU, for inference and training).
    "auto" picks the loop on a CPU and the prefix scan elsewhere (and while exporting a graph).
    """
    _check(u, delta, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, length, d = u.shape
    n = A.shape[-1]
    if intra_chunk == "auto":  # an exported graph takes the vectorised prefix scan: no loop over positions
        intra_chunk = "sequential" if u.device.type == "cpu" and not is_exporting() else "parallel"
    if intra_chunk not in ("parallel", "sequential"):
        raise ValueError(f"intra_chunk must be 'auto', 'parallel' or 'sequential', got {intra_chunk!r}")
    acc_dtype = _acc(A).dtype
    h = A.new_zeros(b, d, n, dtype=acc_dtype) if initial_state is None else _acc(initial_state)
    if intra_chunk == "sequential":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, initial_state)
        )
        if not needs_grad and native.supports(u, delta, A, B, C, D, z, h):
            # inference: the compiled kernel also applies the skip connection and the gate
            y, h, _ = native.selective_scan_fwd(u, delta, A, B, C, D, z, h)
            return y, h
        y, h = _SequentialChunkScan.apply(u, delta, A, B, C, h, chunk_size)
        return _finish(y, u, D, z), h
    A = _acc(A)
    ys = []
    for start in range(0, length, chunk_size):
        _, dA, dBu = _discretize(u, delta, A, B, slice(start, start + chunk_size))
        P, X = _prefix_scan(dA, dBu)
        H = torch.addcmul(X, P, h[:, None])  # (B, T, D, N): state after each step
        h = H[:, -1]
        ys.append(torch.einsum("btdn,btn->btd", H, _acc(C[:, start:start + chunk_size])))
    y = torch.cat(ys, dim=1) if ys else A.new_zeros(b, 0, d)
    return _finish(y, u, D, z), h


def selective_scan_step(state, u_t, delta_t, A, B_t, C_t, D=None, z_t=None):
    """One token. state (B, D, N) float32, u_t/delta_t/z_t (B, D), B_t/C_t (B, N) -> (y_t (B, D), new_state).

    Pure: the input state is not modified, so a saved state stays valid after stepping.
    """
    if state.dim() != 3 or u_t.dim() != 2:
        raise ValueError(f"step wants state (B, D, N) and u_t (B, D); got {tuple(state.shape)}, {tuple(u_t.shape)}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (state, u_t, delta_t, A, B_t, C_t, D, z_t)
    )
    if not needs_grad and native.supports(state, u_t, delta_t, A, B_t, C_t, D, z_t):
        y, new_state, _ = native.selective_scan_fwd(
            u_t[:, None], delta_t[:, None], A, B_t[:, None], C_t[:, None], D, None if z_t is None else z_t[:, None], state
        )
        return y[:, 0], new_state
    dt = _acc(delta_t)
    dA = torch.exp(dt[..., None] * _acc(A))
    dBu = (dt * _acc(u_t))[..., None] * _acc(B_t)[:, None, :]
    new_state = torch.addcmul(dBu, dA, _acc(state))
    y = (new_state * _acc(C_t)[:, None, :]).sum(-1)
    return _finish(y, u_t, D, z_t), new_state
