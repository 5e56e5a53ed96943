"""An optional compiled CPU kernel for the Mamba-1 scan, built on first use with the system C compiler.

PyTorch's eager mode pays a few microseconds per operation, and a scan that steps through time issues one
operation per token; a plain C loop does the same arithmetic without that toll (and without materialising
any (B, L, D, N) tensor). The kernel (csrc/selective_scan.c) is compiled once per machine into a cache folder
($LEANSEQ_CACHE or ~/.cache/leanseq) and loaded with ctypes: no torch headers, so the build takes about a
second. Threads: ctypes releases the GIL, so channel blocks run in parallel Python threads.

Selection happens once, on first use, never at import: LEANSEQ_NATIVE=0 (or `set_enabled(False)`) keeps the
pure-PyTorch path; with no compiler the PyTorch path is used and `status()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "selective_scan.c"
_lock = threading.Lock()
_lib = None
_reason = "not built yet"
_enabled: bool | None = None  # None: decided from LEANSEQ_NATIVE on first use
_pool: ThreadPoolExecutor | None = None


def set_enabled(flag: bool | None) -> None:
    """Force the compiled kernel on (True) or off (False); None returns to the LEANSEQ_NATIVE default."""
    global _enabled
    _enabled = flag


def _cache_dir() -> Path:
    root = os.environ.get("LEANSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "leanseq")
    return Path(root) / "native"


def _cpu_tag() -> str:
    """Builds use -march=native, so a cached library is only valid on the same kind of processor."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        pass
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:12]


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc or set CC); using the PyTorch scan")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"selective_scan-{key}-{_cpu_tag()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", str(_SOURCE), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling the scan kernel failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written library
    lib = ctypes.CDLL(str(target))
    fn = lib.leanseq_selective_scan_fwd
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 7
    bwd = lib.leanseq_selective_scan_bwd
    bwd.restype = ctypes.c_int
    bwd.argtypes = [ctypes.c_void_p] * 14 + [ctypes.c_int64] * 7
    return lib


def build_library(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile another C file the way the scan kernel is built (same compiler, flags and cache folder) and
    load it. Raises RuntimeError or OSError when that is impossible; callers fall back to PyTorch."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    source = Path(source)
    key = hashlib.sha256(source.read_bytes() + compiler.encode() + " ".join(extra_flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}-{_cpu_tag()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", *extra_flags, str(source),
               "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written library
    return ctypes.CDLL(str(target))


def available() -> bool:
    """Whether the compiled kernel is in use (builds it on the first call)."""
    global _lib, _reason
    enabled = _enabled if _enabled is not None else os.environ.get("LEANSEQ_NATIVE", "1") != "0"
    if not enabled:
        _reason = "disabled (LEANSEQ_NATIVE=0 or set_enabled(False))"
        return False
    if _lib is None:
        with _lock:
            if _lib is None and _reason == "not built yet":
                try:
                    _lib = _build()
                    _reason = "compiled kernel in use"
                except (RuntimeError, OSError) as exc:
                    _reason = str(exc)
    return _lib is not None


def status() -> str:
    available()
    return _reason


def supports(*tensors) -> bool:
    """The kernel handles float32 CPU tensors only; anything else takes the PyTorch path."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors) and available()


def _ptr(t):
    return None if t is None else t.data_ptr()


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, h=None, chunk: int = 0, threads: int | None = None):
    """Run the kernel. Returns (y (B, L, D), final h (B, D, N), chunk start states (B, n_chunks, D, N) or None).

    `h` is the initial state; it is copied, never modified.
    """
    batch, length, dim = u.shape
    nstate = A.shape[-1]
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D = None if D is None else D.contiguous()
    z = None if z is None else z.contiguous()
    h = torch.zeros(batch, dim, nstate) if h is None else h.detach().clone(memory_format=torch.contiguous_format)
    y = torch.empty(batch, length, dim)
    starts = torch.empty(batch, (length + chunk - 1) // chunk, dim, nstate) if chunk > 0 else None
    args = [_ptr(t) for t in (u, delta, A, B, C, D, z, h, y, starts)]
    _run_blocks(_lib.leanseq_selective_scan_fwd, args, (batch, length, dim, nstate, chunk), threads,
                batch * length * dim * nstate)
    return y, h, starts


def _channel_blocks(dim: int, threads: int | None, work: int) -> list[tuple[int, int]]:
    """Split channels across threads, but use one thread unless the work pays for waking another."""
    threads = threads or torch.get_num_threads()
    blocks = max(1, min(threads, dim // 64, work // 200_000 + 1))
    edges = [dim * i // blocks for i in range(blocks + 1)]
    return list(itertools.pairwise(edges))


def _run_blocks(fn, args, sizes, threads, work, per_block_args=None):
    """Call fn(*args, *sizes, d0, d1) for each channel block, in parallel threads (ctypes drops the GIL)."""
    global _pool
    blocks = _channel_blocks(sizes[2], threads, work)
    calls = [(*(per_block_args(i) if per_block_args else args), *sizes, d0, d1) for i, (d0, d1) in enumerate(blocks)]
    if len(calls) == 1:
        results = [fn(*calls[0])]
    else:
        if _pool is None or _pool._max_workers < len(calls):
            _pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="leanseq-scan")
        results = [f.result() for f in [_pool.submit(fn, *c) for c in calls]]
    if any(results):
        raise MemoryError("the compiled scan kernel could not allocate its work buffers")
    return len(calls)


def selective_scan_bwd(u, delta, A, B, C, starts, grad_y, grad_h, chunk: int, threads: int | None = None):
    """Gradients of y = scan(u, delta, A, B, C, h0) (no skip, no gate) given the forward's chunk start states.

    Returns (du, ddelta, dA, dB, dC, dh0), all float32.
    """
    batch, length, dim = u.shape
    nstate = A.shape[-1]
    u, delta, A, B, C, starts = (t.contiguous() for t in (u, delta, A, B, C, starts))
    grad_y = grad_y.contiguous()
    grad_h = None if grad_h is None else grad_h.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = torch.zeros_like(A)
    dh0 = torch.empty(batch, dim, nstate)
    blocks = _channel_blocks(dim, threads, batch * length * dim * nstate)
    dB_parts = torch.zeros(len(blocks), *B.shape)
    dC_parts = torch.zeros(len(blocks), *C.shape)
    shared = [_ptr(t) for t in (u, delta, A, B, C, starts, grad_y, grad_h, du, ddelta, dA)]

    def block_args(i):
        return [*shared, dB_parts[i].data_ptr(), dC_parts[i].data_ptr(), dh0.data_ptr()]

    _run_blocks(_lib.leanseq_selective_scan_bwd, None, (batch, length, dim, nstate, chunk), threads,
                batch * length * dim * nstate, per_block_args=block_args)
    return du, ddelta, dA, dB_parts.sum(0), dC_parts.sum(0), dh0
