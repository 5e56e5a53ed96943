"""Compiled no-grad prefill kernels (csrc/prefill.c): Mamba-2's chunked SSD scan, the causal conv + SiLU and
the gated RMSNorm, each in one C pass instead of several PyTorch passes.

`ssd_chunked`, `causal_conv1d` and `GatedRMSNorm` call `try_ssd`, `try_conv_silu` and `try_gated_rmsnorm`
first; these return None (and the PyTorch code runs) unless:
- autograd is off for the call (no gradient flows through the C code, so training keeps the PyTorch path);
- every input is a float32 CPU tensor (and, for the scan, head_dim is a multiple of 16), and no export or
  trace is recording;
- the kernels build (same compiler, cache and checks as leanseq.ops.native; LEANSEQ_NATIVE=0 or
  `native.set_enabled(False)` turns them off, as does `set_enabled(False)` here).
Results equal the PyTorch code's to float32 rounding (tests/ops/test_prefill_native.py).

Threads: the work (the scan's heads, the conv's and norm's rows) is split over an OpenMP team of
torch.get_num_threads() threads, in torch's own OpenMP runtime. The library is built with -fopenmp and so needs libgomp.so.1, which the loader resolves to the one
torch already loaded; `_shared_runtime()` checks that only one libgomp is mapped before the team entry is
used. Torch's workers are still spinning from its previous parallel op, so they take the work at once;
Python threads (as leanseq.ops.native uses) would instead compete with those spinning workers for the
cores (one layer's scan at the 130m shape: 7.6 ms on two Python threads, 2.9 ms on the team). Where the team cannot be used (no -fopenmp, another runtime),
the kernel runs on the calling thread alone.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from leanseq.ops import native
from leanseq.ops.export_mode import is_exporting

_SOURCE = Path(__file__).parent / "csrc" / "prefill.c"
_NO_MEMORY, _BAD_SIZES = 1, 2

_lock = threading.Lock()
_lib = None
_reason = "not built yet"
_team = False  # whether the library has the OpenMP entry and shares torch's runtime
_enabled: bool | None = None  # None: follow the native kernels' switch (LEANSEQ_NATIVE / native.set_enabled)


def set_enabled(flag: bool | None) -> None:
    """Force the compiled prefill kernels on (True) or off (False); None follows leanseq.ops.native's switch."""
    global _enabled
    _enabled = flag


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# name -> argument types; the *_team entries take a thread count where the plain ones take a range
_SIGNATURES = {
    "leanseq_ssd_prefill": [_P] * 9 + [_I] * 11,
    "leanseq_conv_silu": [_P, _I, _P, _P, _P, _P] + [_I] * 6,
    "leanseq_gated_rmsnorm": [_P, _P, _I, _P, _P, _I, _I, _I, _F, _I, _I],
}


def _declare(lib, team: bool = False) -> None:
    for name, argtypes in _SIGNATURES.items():
        for entry, types in ((name, argtypes), *([(name + "_team", argtypes[:-1])] if team else [])):
            fn = getattr(lib, entry)
            fn.restype = ctypes.c_int
            fn.argtypes = types


def _declare_team(lib) -> None:
    _declare(lib, team=True)


def _shared_runtime() -> bool:
    """True when exactly one OpenMP runtime file is mapped into this process (Linux; elsewhere False)."""
    try:
        with open("/proc/self/maps") as maps:
            files = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return False
    return len(files) == 1 and "parallel backend: OpenMP" in torch.__config__.parallel_info()


def library():
    """The compiled library, built on first use; None (and `status()` says why) when it cannot be built."""
    global _lib, _reason, _team
    if _lib is None and _reason == "not built yet":
        with _lock:
            if _lib is None and _reason == "not built yet":
                try:
                    try:  # with OpenMP first; a compiler without it still gets the single-thread build
                        lib, how = native.build_library(_SOURCE, ("-fopenmp",), declare=_declare_team)
                        _team = _shared_runtime()
                    except (RuntimeError, OSError, AttributeError):
                        lib, how = native.build_library(_SOURCE, declare=_declare)
                        _team = False
                    _lib = lib
                    _reason = how.replace("compiled kernel", "compiled prefill kernels", 1) + (
                        "" if _team else " (one thread: torch's OpenMP runtime cannot be shared)")
                except (RuntimeError, OSError, AttributeError) as exc:
                    _reason = f"compiled prefill kernels unavailable: {exc}"
    return _lib


def enabled() -> bool:
    # a graph being recorded (export, jit trace, torch.compile) cannot hold a call through raw pointers
    if is_exporting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return _enabled if _enabled is not None else native._is_enabled()


def status() -> str:
    if not enabled():
        return "disabled (LEANSEQ_NATIVE=0 or set_enabled(False))"
    library()
    return _reason


def _applies(*tensors) -> bool:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        return False
    return enabled() and library() is not None


def _check(code: int, what: str, sizes) -> None:
    if code == _NO_MEMORY:
        raise MemoryError(f"the compiled {what} could not allocate its work buffers")
    if code:
        raise ValueError(f"the compiled {what} refused its sizes {sizes} (code {code})")


def _rows(t: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """t (b, l, k, w) -> (a tensor whose last two dims are packed, token stride): views with unit inner strides
    (such as x, B and C split from one conv output) pass as they are, anything else is made contiguous."""
    l = t.shape[1]
    if t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(0) == l * t.stride(1) and t.stride(1) >= width:
        return t, t.stride(1)
    t = t.contiguous()
    return t, width


def try_ssd(x, dt, A, B, C, D, initial_state, chunk_size: int):
    """(y, final_state) of `ssd_chunked` from the compiled kernel, or None when it does not apply (see the
    module docstring). Shapes were checked by the caller (ssd._check_args)."""
    if x.shape[-1] % 16 or x.shape[1] == 0 or not _applies(x, dt, A, B, C, D, initial_state):
        return None
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = min(chunk_size, l)
    nc = (l + q - 1) // q
    x, x_stride = _rows(x, h * p)
    B, bc_stride = _rows(B, g * n)
    C, c_stride = _rows(C, g * n)
    if c_stride != bc_stride:  # the kernel reads both with one token stride
        B, C, bc_stride = B.contiguous(), C.contiguous(), g * n
    dt, A = dt.contiguous(), A.contiguous()
    D = None if D is None else D.contiguous()
    # C_l . B_s of every chunk and group, shared by the group's heads: (b, c, g, q, q); the last chunk padded
    pad = nc * q - l
    Bp, Cp = (F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t for t in (B, C))
    Bg = Bp.reshape(b, nc, q, g, n).transpose(2, 3)
    Cg = Cp.reshape(b, nc, q, g, n).transpose(2, 3)
    cb = torch.matmul(Cg, Bg.transpose(-1, -2)).contiguous()
    state = torch.zeros(b, h, p, n) if initial_state is None else \
        initial_state.detach().clone(memory_format=torch.contiguous_format)
    y = torch.empty(b, l, h, p)
    args = [t.data_ptr() if t is not None else None for t in (x, dt, A, B, C, D, cb, state, y)]
    sizes = (b, l, h, p, g, n, q, x_stride, bc_stride)
    if _team:
        code = _lib.leanseq_ssd_prefill_team(*args, *sizes, torch.get_num_threads())
    else:
        code = _lib.leanseq_ssd_prefill(*args, *sizes, 0, h)
    _check(code, "SSD prefill", dict(zip(("batch", "length", "heads", "head_dim", "groups", "state", "chunk",
                                          "x_stride", "bc_stride"), sizes, strict=True)))
    return y, state


def try_conv_silu(x, weight, bias, conv_state):
    """(silu(causal depthwise conv of x), new conv state) as `causal_conv1d(..., activation="silu")` computes
    them, or None when the kernel does not apply. x (B, L, C) with unit channel stride (any token stride),
    weight (C, K), bias (C,) or None, conv_state (B, C, K-1) or None (zeros)."""
    batch, length, channels = x.shape
    k = weight.shape[-1]
    if length == 0 or k < 2 or not _applies(x, weight, bias, conv_state):
        return None
    if x.stride(2) != 1 or x.stride(1) < channels or (batch > 1 and x.stride(0) != length * x.stride(1)):
        x = x.contiguous()  # the kernel reads whole token rows of unit stride, one batch row after another
    wt = weight.detach().t().contiguous()  # (K, C): each tap's weights contiguous across channels
    bias = None if bias is None else bias.detach().contiguous()
    state = None if conv_state is None else conv_state.contiguous()
    y = torch.empty(batch, length, channels)
    args = (x.data_ptr(), x.stride(1), None if state is None else state.data_ptr(), wt.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), batch, length, channels, k)
    if _team:
        code = _lib.leanseq_conv_silu_team(*args, torch.get_num_threads())
    else:
        code = _lib.leanseq_conv_silu(*args, 0, batch * length)
    _check(code, "causal conv", {"batch": batch, "length": length, "channels": channels, "kernel": k})
    # the new state: the last K-1 inputs, oldest first, with the old state in front when L < K-1
    old = x.new_zeros(batch, channels, k - 1) if state is None else state
    full_tail = torch.cat([old, x[:, -(k - 1):].transpose(1, 2)], dim=2)
    return y, full_tail[:, :, -(k - 1):].contiguous()


def try_gated_rmsnorm(x, gate, weight, group_size: int, eps: float):
    """`GatedRMSNorm`'s output (x * silu(gate), RMS-normalised per group of `group_size` channels, times
    weight) from the kernel, or None when it does not apply. x and gate (..., D); gate may be a row view."""
    if gate is None or x.shape != gate.shape or x.dim() < 2 or not _applies(x, gate, weight):
        return None
    dim = x.shape[-1]
    rows = x.numel() // dim if dim else 0
    if rows == 0 or weight.shape != (dim,):
        return None
    x = x.contiguous()
    z2 = gate.reshape(rows, dim)  # a view where strides allow (a row view of the input projection), else a copy
    if z2.stride(1) != 1 or z2.stride(0) < dim:  # the kernel reads whole rows of unit stride
        z2 = z2.contiguous()
    out = torch.empty(x.shape)
    w = weight.detach().contiguous()
    args = (x.data_ptr(), z2.data_ptr(), z2.stride(0), w.data_ptr(), out.data_ptr(), rows, dim, group_size, eps)
    if _team:
        code = _lib.leanseq_gated_rmsnorm_team(*args, torch.get_num_threads())
    else:
        code = _lib.leanseq_gated_rmsnorm(*args, 0, rows)
    _check(code, "gated RMSNorm", {"rows": rows, "dim": dim, "group": group_size})
    return out
