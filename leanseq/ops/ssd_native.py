"""The compiled SSD prefill (csrc/ssd_prefill.c): Mamba-2's chunked scan without autograd, in one C pass.

`ssd_chunked` calls `try_prefill` first; it returns None (and the PyTorch chunked scan runs) unless:
- autograd is off for the call (no gradient flows through the C code, so training keeps the PyTorch path);
- every input is a float32 CPU tensor, head_dim is a multiple of 16, and no export or trace is recording;
- the kernel builds (same compiler, cache and checks as leanseq.ops.native; LEANSEQ_NATIVE=0 or
  `native.set_enabled(False)` turns it off, as does `set_enabled(False)` here).
The result equals the PyTorch chunked scan's to float32 rounding (tests/ops/test_ssd_native.py).

Threads: heads are split over an OpenMP team of torch.get_num_threads() threads, in torch's own OpenMP
runtime. The library is built with -fopenmp and so needs libgomp.so.1, which the loader resolves to the one
torch already loaded; `_shared_runtime()` checks that only one libgomp is mapped before the team entry is
used. Torch's workers are still spinning from its previous parallel op, so they take the work at once;
Python threads (as leanseq.ops.native uses) would instead compete with those spinning workers for the
cores (measured: 2.6x slower on 2 cores). Where the team cannot be used (no -fopenmp, another runtime),
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

_SOURCE = Path(__file__).parent / "csrc" / "ssd_prefill.c"
_NO_MEMORY, _BAD_SIZES = 1, 2

_lock = threading.Lock()
_lib = None
_reason = "not built yet"
_team = False  # whether the library has the OpenMP entry and shares torch's runtime
_enabled: bool | None = None  # None: follow the native kernels' switch (LEANSEQ_NATIVE / native.set_enabled)


def set_enabled(flag: bool | None) -> None:
    """Force the compiled SSD prefill on (True) or off (False); None follows leanseq.ops.native's switch."""
    global _enabled
    _enabled = flag


def _declare(lib) -> None:
    fn = lib.leanseq_ssd_prefill
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 11


def _declare_team(lib) -> None:
    _declare(lib)
    fn = lib.leanseq_ssd_prefill_team
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 10


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
                    _reason = how.replace("compiled kernel", "compiled SSD prefill kernel", 1) + (
                        "" if _team else " (one thread: torch's OpenMP runtime cannot be shared)")
                except (RuntimeError, OSError, AttributeError) as exc:
                    _reason = f"compiled SSD prefill unavailable: {exc}"
    return _lib


def enabled() -> bool:
    if is_exporting():
        return False
    return _enabled if _enabled is not None else native._is_enabled()


def status() -> str:
    if not enabled():
        return "disabled (LEANSEQ_NATIVE=0 or set_enabled(False))"
    library()
    return _reason


def _applies(x, dt, A, B, C, D, initial_state) -> bool:
    tensors = (x, dt, A, B, C, D, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        return False
    return x.shape[-1] % 16 == 0 and x.shape[1] > 0 and enabled() and library() is not None


def _rows(t: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """t (b, l, k, w) -> (a tensor whose last two dims are packed, token stride): views with unit inner strides
    (such as x, B and C split from one conv output) pass as they are, anything else is made contiguous."""
    l = t.shape[1]
    if t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(0) == l * t.stride(1) and t.stride(1) >= width:
        return t, t.stride(1)
    t = t.contiguous()
    return t, width


def try_prefill(x, dt, A, B, C, D, initial_state, chunk_size: int):
    """(y, final_state) from the compiled kernel, or None when it does not apply (see the module docstring).
    Shapes were checked by the caller (ssd._check_args)."""
    if not _applies(x, dt, A, B, C, D, initial_state):
        return None
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = min(chunk_size, l)
    nc = (l + q - 1) // q
    x, x_stride = _rows(x, h * p)
    if B.stride() == C.stride() and B.stride(3) == 1 and B.stride(2) == n and B.stride(0) == l * B.stride(1):
        bc_stride = B.stride(1)
    else:
        B, C = B.contiguous(), C.contiguous()
        bc_stride = g * n
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
    if code == _NO_MEMORY:
        raise MemoryError("the compiled SSD prefill could not allocate its work buffers")
    if code:
        raise ValueError(f"the compiled SSD prefill refused its sizes (batch, length, heads, head_dim, groups, state, "
                         f"chunk, strides = {sizes}; code {code})")
    return y, state
