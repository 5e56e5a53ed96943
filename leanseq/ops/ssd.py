"""Mamba-2's state space duality (SSD) scan: a readable sequential reference, the chunked algorithm, one step.

Per head h the recurrence is (a scalar decay per head, so the state is a (head_dim, state_size) matrix):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        S: (p, n), x_t: (p,), B_t: (n,)
    y_t = S_t C_t + D * x_t

Heads are split into `g` groups that share B and C (head h uses group h // (h / g), as in Mamba-2).
Layout is channel-last: x (b, l, h, p), dt (b, l, h), B and C (b, l, g, n). `dt` arrives already positive
(softplus, bias and clamp are the caller's job). States are (b, h, p, n) and kept in float32.

`ssd_chunked` splits the sequence into chunks of Q tokens. Inside a chunk the output is a masked
"attention" product (C B^T weighted by the decays between positions); across chunks only the (p, n) states
travel, through a short loop over chunks. Work is O(L * Q) per head and nothing (L, L)-sized is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanseq.ops import prefill_native


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (so gradcheck can run in double precision)."""
    double = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if double else torch.float32


def _check_args(x, dt, A, B, C, D, initial_state) -> tuple[int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seq_len, heads, head_dim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be (batch={b}, seq_len={l}, groups, state), got shape {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, seq_len, heads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (heads,) = ({h},), got {tuple(A.shape)}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be (heads,) = ({h},), got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be (batch, heads, head_dim, state) = {(b, h, p, n)}, "
                         f"got {tuple(initial_state.shape)}")
    return b, l, h, p, g, n


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time. Returns (y (b, l, h, p), final_state (b, h, p, n)).

    y has x's dtype; the state is float32 (float64 when any input is float64).
    """
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, D, initial_state)
    ct = _compute_dtype(x, dt, A, B, C, D, initial_state)
    heads_per_group = h // g
    # give every head its group's B and C: (b, l, h, n)
    Bh = B.to(ct).repeat_interleave(heads_per_group, dim=2)
    Ch = C.to(ct).repeat_interleave(heads_per_group, dim=2)
    xf, dtf, Af = x.to(ct), dt.to(ct), A.to(ct)
    state = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        update = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[:, :, None, None] * state + update
        y_t = (state * Ch[:, t, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y_t = y_t + D.to(ct)[:, None] * xf[:, t]
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    return y.to(x.dtype), state


def ssd_step(
    state: torch.Tensor,
    x_t: torch.Tensor,
    dt_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: state (b, h, p, n), x_t (b, h, p), dt_t (b, h), B_t/C_t (b, g, n) -> (y_t (b, h, p), state).

    The input state is left untouched; the new state has the input state's dtype.
    """
    b, h, p = x_t.shape
    if B_t.dim() != 3 or B_t.shape[0] != b or h % B_t.shape[1]:
        raise ValueError(f"B_t must be (batch={b}, groups dividing {h}, state), got {tuple(B_t.shape)}")
    g, n = B_t.shape[1:]
    if C_t.shape != B_t.shape:
        raise ValueError(f"C_t must have B_t's shape {tuple(B_t.shape)}, got {tuple(C_t.shape)}")
    if state.shape != (b, h, p, n):
        raise ValueError(f"state must be (batch, heads, head_dim, state) = {(b, h, p, n)}, "
                         f"got {tuple(state.shape)}")
    if dt_t.shape != (b, h):
        raise ValueError(f"dt_t must be (batch, heads) = {(b, h)}, got {tuple(dt_t.shape)}")
    ct = _compute_dtype(state, x_t, dt_t, A, B_t, C_t, D)
    xf, dtf = x_t.to(ct), dt_t.to(ct)
    # (b, g, hg, ...) views let heads share their group's B and C without copying them per head
    hg = h // g
    decay = torch.exp(dtf * A.to(ct)).reshape(b, g, hg, 1, 1)
    dx = (dtf[..., None] * xf).reshape(b, g, hg, p, 1)
    new_state = decay * state.to(ct).reshape(b, g, hg, p, n) + dx * B_t.to(ct).reshape(b, g, 1, 1, n)
    y = torch.matmul(new_state, C_t.to(ct).reshape(b, g, 1, n, 1)).reshape(b, h, p)
    if D is not None:
        y = y + D.to(ct)[:, None] * xf
    return y.to(x_t.dtype), new_state.reshape(b, h, p, n).to(state.dtype)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ssd_reference`, computed chunk by chunk. Returns (y (b, l, h, p), final_state)."""
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ct = _compute_dtype(x, dt, A, B, C, D, initial_state)
    if l == 0:
        state = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
        return x.new_zeros(b, 0, h, p), state
    # without autograd, on float32 CPU tensors: the same algorithm compiled (leanseq.ops.prefill_native)
    done = prefill_native.try_ssd(x, dt, A, B, C, D, initial_state, chunk_size)
    if done is not None:
        return done
    hg = h // g
    q = min(chunk_size, l)
    pad = (-l) % q
    xf, dtf, Bf, Cf = x.to(ct), dt.to(ct), B.to(ct), C.to(ct)
    if pad:
        # padded steps have dt = 0: decay 1 and no input, so they leave the state as it was
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    nc = (l + pad) // q
    # without autograd, intermediates are overwritten in place instead of allocating new ones
    inplace = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, initial_state)))

    # Layout: positions stay channel-last as they arrive, (b, c, q, h, p) with heads split as (g, hg); only
    # the (b, c, g, q, n) views of B and C are transposed (for free, as matmul operands). The state-sized
    # products put a group's heads side by side along the columns, (q, hg * p), so each is one matmul per
    # chunk and group with no copy of B or C per head, and the read-out lands in the output's own layout.
    a_cum = (dtf * A.to(ct)).reshape(b, nc, q, h).cumsum(dim=2)  # (b, c, q, h) log decay from chunk start
    x_dt = (xf * dtf[..., None]).reshape(b, nc, q, g, hg, p)
    Bg = Bf.reshape(b, nc, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cg = Cf.reshape(b, nc, q, g, n).transpose(2, 3)  # (b, c, g, q, n)

    # 1. within each chunk: y[l] = sum_{s<=l} (C_l . B_s) exp(a_cum[l] - a_cum[s]) dt_s x_s
    a_heads = a_cum.reshape(b, nc, q, g, hg).permute(0, 1, 3, 4, 2)  # (b, c, g, hg, q)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    # mask before exp: above the diagonal the difference is positive and could overflow
    log_decay = (a_heads[..., :, None] - a_heads[..., None, :]).masked_fill_(~causal, float("-inf"))
    scores = torch.matmul(Cg, Bg.transpose(-1, -2))[:, :, :, None]  # (b, c, g, 1, q, q)
    decay = torch.exp(log_decay)  # (b, c, g, hg, q, q)
    weights = decay.mul_(scores) if inplace else decay * scores
    y_intra = torch.matmul(weights, x_dt.permute(0, 1, 3, 4, 2, 5))  # (b, c, g, hg, q, p)

    # 2. each chunk's contribution to the state at its end, from zero, transposed with heads along the
    #    columns: (n, hg * p) = B^T (n, q) @ (x dt decayed to the chunk end) (q, hg * p)
    decay_to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # (b, c, q, h)
    x_end = x_dt * decay_to_end.reshape(b, nc, q, g, hg, 1)
    x_end = x_end.reshape(b, nc, q, g, hg * p).transpose(2, 3)  # (b, c, g, q, hg * p)
    chunk_states = torch.matmul(Bg.transpose(-1, -2), x_end).reshape(b, nc, g, n, hg, p)

    # 3. pass states across chunks in that (b, g, n, hg, p) layout: the state entering each chunk, the final one
    chunk_decay = torch.exp(a_cum[:, :, -1]).reshape(b, nc, g, 1, hg, 1)
    if initial_state is None:
        state = xf.new_zeros(b, g, n, hg, p)
    else:
        state = initial_state.to(ct).reshape(b, g, hg, p, n).permute(0, 1, 4, 2, 3)
    if inplace:
        entering = xf.new_empty(nc, b, g, n, hg, p)  # chunk-major: each chunk's slot is one contiguous block
        entering[0] = state
        for c in range(nc - 1):
            torch.addcmul(chunk_states[:, c], chunk_decay[:, c], entering[c], out=entering[c + 1])
        state = torch.addcmul(chunk_states[:, -1], chunk_decay[:, -1], entering[-1])
        entering = entering.transpose(0, 1)
    else:
        entering = []
        for c in range(nc):
            entering.append(state)
            state = chunk_decay[:, c] * state + chunk_states[:, c]
        entering = torch.stack(entering, dim=1)  # (b, c, g, n, hg, p)

    # 4. the entering state read out at every position, decayed from the chunk start: (q, n) @ (n, hg * p)
    y = torch.matmul(Cg, entering.reshape(b, nc, g, n, hg * p))  # (b, c, g, q, hg * p)
    y = y.reshape(b, nc, g, q, hg, p).transpose(2, 3)  # (b, c, q, g, hg, p): a view, the output's layout
    decay_in = torch.exp(a_cum).reshape(b, nc, q, g, hg, 1)
    y_intra = y_intra.permute(0, 1, 4, 2, 3, 5)  # (b, c, q, g, hg, p)
    y = y.mul_(decay_in).add_(y_intra) if inplace else y * decay_in + y_intra
    y = y.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        Dh = D.to(ct)[:, None]
        y = y.addcmul_(xf[:, :l], Dh) if inplace else y + Dh * xf[:, :l]
    state = state.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
    return y.to(x.dtype), state
