"""An optional compiled CPU kernel for the Mamba-1 scan, built on first use with the system C compiler.

PyTorch's eager mode pays a few microseconds per operation, and a scan that steps through time issues one
operation per token; a plain C loop does the same arithmetic without that toll (and without materialising
any (B, L, D, N) tensor). The kernel (csrc/selective_scan.c) is compiled once per machine into a cache folder
($LEANSEQ_CACHE or ~/.cache/leanseq) and loaded with ctypes: no torch headers, so the build takes about a
second. Threads: ctypes releases the GIL, so channel blocks run in parallel Python threads.

Selection happens once, on first use, never at import: LEANSEQ_NATIVE=0 (or `set_enabled(False)`) keeps the
pure-PyTorch path; with no compiler the PyTorch path is used and `status()` says why.

The cache is trusted only after checks, because loading a library runs its code:
- the cache folder (and each folder up to the cache root) must belong to this user and be writable by no one
  else; otherwise a warning is issued and the kernel is built into a private temporary folder, used by this
  process only (status() says so);
- at build time an HMAC-SHA256 of the library, keyed by a random per-cache secret (a 0600 file), is written
  beside it; the library is loaded only if the file read back matches it, and the bytes checked are the
  bytes loaded (through the open file on Linux). A torn, truncated or planted library, or one without the
  kernel's symbols, is rebuilt once; if that fails too the PyTorch path is used and status() says why.
  This guards against corruption and against anyone who can write files but cannot read the secret; it
  does not guard against code running as this user, which can read the secret (or edit leanseq itself);
- library and record are written to temporary files, fsynced and renamed, and the folder is fsynced;
- `CC` is split into words like make does ("ccache gcc -O2"); the compiler runs under a timeout
  (LEANSEQ_CC_TIMEOUT seconds, default 120), after which it and its children are stopped.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import hashlib
import hmac
import itertools
import math
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from leanseq.fileio import cache_root, write_file_atomic
from leanseq.ops.export_mode import is_exporting

_SOURCE = Path(__file__).parent / "csrc" / "selective_scan.c"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
# Linked in a second command without -ffast-math: linking with it adds crtfastmath.o, whose constructor turns on
# flush-to-zero and denormals-are-zero for the loading thread, changing every later float operation of the
# user's process (numpy warns "smallest subnormal ... is zero").
_LINK_FLAGS = ["-shared"]
_DEFAULT_CC_TIMEOUT = 120.0
_RECORD_TAG = "leanseq-kernel-hmac-sha256-v1"
_SECRET_BYTES = 32
_MAX_LIBRARY_BYTES = 64 << 20  # the kernel is tens of kilobytes: a bigger file is not ours

# The kernel's buffers in argument order, and its return codes (see csrc/selective_scan.c).
_FWD_BUFFERS = ("u", "delta", "A", "B", "C", "D", "z", "h", "y", "starts")
_BWD_BUFFERS = ("u", "delta", "A", "B", "C", "starts", "grad_y", "grad_h", "du", "ddelta", "dA", "dB_part",
                "dC_part", "dh0")
_NO_MEMORY, _BAD_SIZES, _BAD_BUFFER = 1, 2, 16
_SIZE_NAMES = ("batch", "length", "dim", "nstate", "chunk")

_lock = threading.Lock()
_lib = None
_reason = "not built yet"
_enabled: bool | None = None  # None: decided from LEANSEQ_NATIVE on first use
_pool: ThreadPoolExecutor | None = None
# Open files of the libraries handed to the loader. Kept open for the life of the process: the loader knows
# them as /proc/self/fd/N, and glibc returns an already-loaded library for a name it has seen, so a number
# must never be reused for another library.
_library_files: list[int] = []


class _Rejected(Exception):
    """A library in the cache that must not, or could not, be loaded; the message says why."""


def set_enabled(flag: bool | None) -> None:
    """Force the compiled kernel on (True) or off (False); None returns to the LEANSEQ_NATIVE default."""
    global _enabled
    _enabled = flag


def _reset() -> None:
    """Forget the selection so the next use selects again (for tests; a loaded library stays mapped)."""
    global _lib, _reason
    with _lock:
        _lib, _reason = None, "not built yet"


def _cache_dir() -> Path:
    return cache_root() / "native"


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


def _compiler_command() -> list[str]:
    """The compiler as a command: $CC split into words like make does, else cc, gcc or clang from PATH."""
    cc = os.environ.get("CC", "")
    if cc.strip():
        try:
            return shlex.split(cc)
        except ValueError as exc:  # an unclosed quote
            raise RuntimeError(f"CC={cc!r} cannot be split into a command ({exc}); using the PyTorch scan") from None
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        raise RuntimeError("no C compiler found (install gcc or set CC); using the PyTorch scan")
    return [found]


def _compiler_timeout() -> float:
    text = os.environ.get("LEANSEQ_CC_TIMEOUT", "")
    if not text.strip():
        return _DEFAULT_CC_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RuntimeError(f"LEANSEQ_CC_TIMEOUT must be a positive number of seconds, got {text!r}; "
                           "using the PyTorch scan")
    return seconds


def _run_compiler(cmd: list[str], timeout: float) -> None:
    """Run the compiler in its own process group, so that a timeout stops its children (cc1, as, ld) too."""
    new_group = hasattr(os, "killpg")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=new_group)
    except OSError as exc:
        raise RuntimeError(f"cannot run the C compiler {cmd[0]!r} ({exc}); using the PyTorch scan") from None

    def stop():
        try:
            os.killpg(proc.pid, signal.SIGKILL) if new_group else proc.kill()
        except ProcessLookupError:
            pass
        proc.communicate()

    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop()
        raise RuntimeError(f"compiling the scan kernel took longer than {timeout:g} s (LEANSEQ_CC_TIMEOUT) "
                           f"and was stopped ({shlex.join(cmd)}); using the PyTorch scan") from None
    except BaseException:  # Ctrl-C: never leave a compiler running
        stop()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the scan kernel failed ({shlex.join(cmd)}):\n{err[-2000:]}")


def _unsafe_reason(folder: Path, root: Path) -> str | None:
    """Why libraries in `folder` could be swapped by someone else, or None: `folder` and every folder up to
    `root` must be a directory owned by this user that neither group nor others can write to."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX owners (Windows): rely on the user's profile permissions
    uid = os.getuid()
    for path in (folder, *folder.parents):
        info = os.stat(path)  # follows links: what must be private is the folder actually written to
        if not stat.S_ISDIR(info.st_mode):
            return f"{path} is not a directory"
        if info.st_uid != uid:
            return f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} can be written by others (mode {stat.S_IMODE(info.st_mode):o}; fix: chmod go-w {path})"
        if path == root:
            return None
    return None


def _prepare_cache(folder: Path, root: Path) -> str | None:
    """Create the cache folders private (0700) where missing; returns why they cannot be trusted, or None."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        for path in (root, folder):  # the root is checked before anything is created inside it
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            problem = _unsafe_reason(path, root)
            if problem is not None:
                return problem
        return None
    except OSError as exc:
        return f"it cannot be created or inspected ({exc})"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_private(path: Path) -> int:
    """Open a cache file for reading, refusing links and files that others can write (or read, for secrets)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Rejected(f"{path} cannot be opened ({exc})") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif hasattr(os, "getuid") and info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to this user"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"can be written by others (mode {stat.S_IMODE(info.st_mode):o})"
    elif info.st_size > _MAX_LIBRARY_BYTES:
        problem = f"is {info.st_size} bytes, far more than the kernel"
    if problem:
        os.close(fd)
        raise _Rejected(f"{path} {problem}")
    return fd


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _cache_secret(folder: Path) -> bytes:
    """The cache's HMAC key: 32 random bytes in a 0600 file, created once (the first writer wins a race)."""
    path = folder / "hmac.key"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(_SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # unlike a rename, never replaces a key another process made meanwhile
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        _fsync_dir(folder)
    fd = _open_private(path)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            raise _Rejected(f"{path} can be read by others, so records made with it could be forged")
        secret = _read_fd(fd)
    finally:
        os.close(fd)
    if len(secret) != _SECRET_BYTES:
        raise _Rejected(f"{path} holds {len(secret)} bytes, not the {_SECRET_BYTES} of a key")
    return secret


def _record_text(secret: bytes, build_key: str, library: bytes) -> str:
    mac = hmac.new(secret, build_key.encode() + b"\0" + library, hashlib.sha256).hexdigest()
    return f"{_RECORD_TAG} {build_key} {mac}\n"


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".hmac")


def _declare(lib: ctypes.CDLL) -> None:
    """Declare the kernel's signatures; AttributeError when a symbol is missing."""
    fwd = lib.leanseq_selective_scan_fwd
    fwd.restype = ctypes.c_int
    fwd.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 8
    bwd = lib.leanseq_selective_scan_bwd
    bwd.restype = ctypes.c_int
    bwd.argtypes = [ctypes.c_void_p] * 15 + [ctypes.c_int64] * 8


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One C library built and cached the same way: its source, extra compiler flags, and a function that
    declares its symbols' signatures (raising AttributeError when one is missing)."""

    source: Path
    extra_flags: tuple[str, ...]
    declare: Callable[[ctypes.CDLL], None]


_SCAN_KERNEL = _Kernel(_SOURCE, (), _declare)


def _load_from(fd: int, path: Path, kernel: _Kernel) -> ctypes.CDLL:
    """Load the library open as `fd`: through /proc/self/fd where there is one, so that the bytes checked are
    the bytes mapped even if the path is swapped meanwhile; by path elsewhere."""
    by_fd = f"/proc/self/fd/{fd}"
    _library_files.append(fd)
    try:
        lib = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
    except OSError as exc:
        raise _Rejected(f"the loader refused {path} ({exc})") from None
    try:
        kernel.declare(lib)
    except AttributeError as exc:
        raise _Rejected(f"{path} lacks the kernel's symbols ({exc})") from None
    return lib


def _load_verified(target: Path, secret: bytes, build_key: str, kernel: _Kernel) -> ctypes.CDLL:
    """Load the cached library only if its bytes match the HMAC recorded when it was built."""
    try:
        fd = _open_private(target)
    except FileNotFoundError:
        raise _Rejected(f"{target} is missing") from None
    try:
        library = _read_fd(fd)
        try:
            rec_fd = _open_private(_record_path(target))
        except FileNotFoundError:
            raise _Rejected(f"{target} has no hash record") from None
        try:
            recorded = os.read(rec_fd, 4096)
        finally:
            os.close(rec_fd)
        expected = _record_text(secret, build_key, library).encode()
        if not hmac.compare_digest(recorded, expected):
            raise _Rejected(f"{target} does not match the hash recorded when it was built")
    except BaseException:
        os.close(fd)
        raise
    return _load_from(fd, target, kernel)


def _compile_and_load(compiler: list[str], target: Path, secret: bytes, build_key: str,
                      kernel: _Kernel) -> ctypes.CDLL:
    """Compile into a temporary file, record its HMAC, fsync both, rename them into place, and load the very
    file that was hashed (a concurrent builder's rename cannot swap it)."""
    timeout = _compiler_timeout()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        obj = tmp[:-3] + ".o"
        try:
            _run_compiler([*compiler, *_FLAGS, *kernel.extra_flags, "-c", str(kernel.source), "-o", obj], timeout)
            _run_compiler([*compiler, *_LINK_FLAGS, *kernel.extra_flags, obj, "-o", tmp, "-lm"], timeout)
        finally:
            if os.path.exists(obj):
                os.unlink(obj)
        os.chmod(tmp, 0o700)  # the linker recreates the file with the umask's mode, which may let the group write
        fd = _open_private(Path(tmp))
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        os.fsync(fd)
        write_file_atomic(_record_path(target), _record_text(secret, build_key, _read_fd(fd)), prefix=".tmp-")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written library
        _fsync_dir(target.parent)
    except BaseException:
        os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _load_from(fd, target, kernel)


def _load_or_build(compiler: list[str], target: Path, secret: bytes, build_key: str,
                   kernel: _Kernel) -> tuple[ctypes.CDLL, str]:
    """The cached library if it checks out, else one rebuild; returns (library, status)."""
    status = "compiled kernel in use"
    if os.path.lexists(target):
        try:
            return _load_verified(target, secret, build_key, kernel), status
        except _Rejected as exc:
            status = f"compiled kernel in use (rebuilt: {exc})"
    try:
        return _compile_and_load(compiler, target, secret, build_key, kernel), status
    except _Rejected as exc:
        raise RuntimeError(f"the freshly compiled kernel cannot be used: {exc}; using the PyTorch scan") from None


def _build(kernel: _Kernel = _SCAN_KERNEL) -> tuple[ctypes.CDLL, str]:
    compiler = _compiler_command()
    source = kernel.source.read_bytes()
    key = hashlib.sha256(source + "\0".join(compiler + _FLAGS + ["(link)"] + _LINK_FLAGS + list(kernel.extra_flags)).encode()).hexdigest()[:16]
    name = f"{kernel.source.stem}-{key}-{_cpu_tag()}.so"
    root, folder = cache_root(), _cache_dir()
    problem = _prepare_cache(folder, root)
    if problem is None:
        try:
            secret = _cache_secret(folder)
        except _Rejected as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"its key cannot be made or read ({exc})"
    if problem is None:
        return _load_or_build(compiler, folder / name, secret, key, kernel)
    warnings.warn(f"leanseq: not using the kernel cache {folder}: {problem}. Building the {kernel.source.stem} "
                  "kernel into a private temporary folder for this process instead.", RuntimeWarning, stacklevel=4)
    with tempfile.TemporaryDirectory(prefix="leanseq-native-") as private:  # 0700, removed once loaded
        try:
            lib = _compile_and_load(compiler, Path(private) / name, os.urandom(_SECRET_BYTES), key, kernel)
        except _Rejected as exc:
            raise RuntimeError(f"the freshly compiled kernel cannot be used: {exc}; using PyTorch") from None
    return lib, (f"compiled kernel in use, built in a private temporary folder (not cached) because the cache "
                 f"{folder} is not safe: {problem}")


def build_library(source: Path, extra_flags: tuple[str, ...] = (),
                  declare: Callable[[ctypes.CDLL], None] = lambda lib: None) -> tuple[ctypes.CDLL, str]:
    """Build (or load from the verified cache) another C file of leanseq's, exactly as the scan kernel is: same
    compiler, flags, timeout, HMAC-checked cache and safe-folder rules. `declare` sets the symbols' signatures
    and raises AttributeError for a missing one (the cached file is then rebuilt). Returns (library, status);
    raises RuntimeError or OSError when no library can be had, and callers fall back to PyTorch."""
    return _build(_Kernel(Path(source), tuple(extra_flags), declare))


def _is_enabled() -> bool:
    return _enabled if _enabled is not None else os.environ.get("LEANSEQ_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the compiled kernel is in use (builds it on the first call)."""
    global _lib, _reason
    if not _is_enabled():
        return False  # the selection is left untouched, so enabling it later still builds
    if _lib is None:
        with _lock:
            if _lib is None and _reason == "not built yet":
                try:
                    _lib, _reason = _build()
                except (RuntimeError, OSError) as exc:
                    _reason = str(exc)
    return _lib is not None


def status() -> str:
    if not available() and not _is_enabled():
        return "disabled (LEANSEQ_NATIVE=0 or set_enabled(False))"
    return _reason


def supports(*tensors) -> bool:
    """The kernel handles float32 CPU tensors only; anything else takes the PyTorch path (as does everything
    while a graph is exported: see leanseq.ops.export_mode)."""
    if is_exporting():
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors) and available()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _check_buffers(names: tuple[str, ...], tensors: tuple, shapes: tuple, sizes: tuple[int, ...]) -> None:
    """The kernel reads and writes raw float32 memory: refuse any tensor that is not exactly what it expects.

    One cheap pass first (a decoding step calls this once per layer and token); names only on a mismatch.
    """
    f32 = torch.float32
    for t, shape in zip(tensors, shapes, strict=True):
        if t is not None and (t.dtype != f32 or t.shape != shape or not t.is_cpu):
            break
    else:
        return
    for name, t, shape in zip(names[:len(tensors)], tensors, shapes, strict=True):
        if t is None:
            continue
        if not t.is_cpu or t.dtype != f32:
            raise ValueError(f"the compiled scan kernel needs {name} as a float32 CPU tensor; "
                             f"got {t.dtype} on {t.device}")
        if t.shape != shape:
            raise ValueError(f"the compiled scan kernel needs {name} of shape {shape} for "
                             f"{', '.join(f'{k}={v}' for k, v in zip(_SIZE_NAMES, sizes))}; "
                             f"got {tuple(t.shape)}")


def _scan_sizes(u, A) -> tuple[int, int, int, int]:
    """(batch, length, dim, nstate) from u (B, L, D) and A (D, N)."""
    if u.dim() != 3:
        raise ValueError(f"the compiled scan kernel needs u as (batch, length, dim); got shape {tuple(u.shape)}")
    if A.dim() != 2:
        raise ValueError(f"the compiled scan kernel needs A as (dim, nstate); got shape {tuple(A.shape)}")
    batch, length, dim = u.shape
    nstate = A.shape[1]
    return batch, length, dim, nstate


def _counts(buffers) -> array.array:
    """Element counts of the buffers, for the kernel's own check (0 for an absent optional buffer).

    An array.array of int64 rather than a ctypes array: half the cost, and a step calls this once per layer.
    """
    return array.array("q", [0 if t is None else t.numel() for t in buffers])


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, h=None, chunk: int = 0, threads: int | None = None):
    """Run the kernel. Returns (y (B, L, D), final h (B, D, N), chunk start states (B, n_chunks, D, N) or None).

    `h` is the initial state; it is copied, never modified. Every tensor must be float32 on the CPU with
    exactly the shape the sizes of u (B, L, D) and A (D, N) imply: anything else raises ValueError.
    """
    batch, length, dim, nstate = _scan_sizes(u, A)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"the compiled scan kernel needs chunk as an int >= 0; got {chunk!r}")
    seq, tokens, state = (batch, length, dim), (batch, length, nstate), (batch, dim, nstate)
    _check_buffers(_FWD_BUFFERS, (u, delta, A, B, C, D, z, h),
                   (seq, seq, (dim, nstate), tokens, tokens, (dim,), seq, state), (batch, length, dim, nstate))
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D = None if D is None else D.contiguous()
    z = None if z is None else z.contiguous()
    h = torch.zeros(batch, dim, nstate) if h is None else h.detach().clone(memory_format=torch.contiguous_format)
    y = torch.empty(batch, length, dim)
    starts = torch.empty(batch, (length + chunk - 1) // chunk, dim, nstate) if chunk > 0 else None
    buffers = (u, delta, A, B, C, D, z, h, y, starts)
    counts = _counts(buffers)  # referenced until the calls return: the kernel reads it through a pointer
    args = [*(_ptr(t) for t in buffers), counts.buffer_info()[0], len(buffers)]
    _run_blocks(_lib.leanseq_selective_scan_fwd, args, (batch, length, dim, nstate, chunk), threads,
                batch * length * dim * nstate, names=_FWD_BUFFERS)
    return y, h, starts


def _channel_blocks(dim: int, threads: int | None, work: int) -> list[tuple[int, int]]:
    """Split channels across threads, but use one thread unless the work pays for waking another."""
    threads = threads or torch.get_num_threads()
    blocks = max(1, min(threads, dim // 64, work // 200_000 + 1))
    edges = [dim * i // blocks for i in range(blocks + 1)]
    return list(itertools.pairwise(edges))


def _run_blocks(fn, args, sizes, threads, work, per_block_args=None, names=()):
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
    code = next((r for r in results if r), 0)
    if code == _NO_MEMORY:
        raise MemoryError("the compiled scan kernel could not allocate its work buffers")
    if _BAD_BUFFER <= code < _BAD_BUFFER + len(names):
        raise ValueError(f"the compiled scan kernel refused buffer {names[code - _BAD_BUFFER]}: its element count "
                         f"does not match batch, length, dim, nstate, chunk = {sizes}")
    if code:
        raise ValueError(f"the compiled scan kernel refused its sizes (batch, length, dim, nstate, chunk = {sizes}; "
                         f"code {code})")
    return len(calls)


def selective_scan_bwd(u, delta, A, B, C, starts, grad_y, grad_h, chunk: int, threads: int | None = None):
    """Gradients of y = scan(u, delta, A, B, C, h0) (no skip, no gate) given the forward's chunk start states.

    Returns (du, ddelta, dA, dB, dC, dh0), all float32. Shapes and dtypes are checked as in the forward.
    """
    batch, length, dim, nstate = _scan_sizes(u, A)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"the compiled scan kernel's backward needs chunk as an int >= 1; got {chunk!r}")
    seq, tokens, state = (batch, length, dim), (batch, length, nstate), (batch, dim, nstate)
    _check_buffers(_BWD_BUFFERS, (u, delta, A, B, C, starts, grad_y, grad_h),
                   (seq, seq, (dim, nstate), tokens, tokens, (batch, (length + chunk - 1) // chunk, dim, nstate), seq,
                    state), (batch, length, dim, nstate, chunk))
    u, delta, A, B, C, starts = (t.contiguous() for t in (u, delta, A, B, C, starts))
    grad_y = grad_y.contiguous()
    grad_h = None if grad_h is None else grad_h.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = torch.zeros_like(A)
    dh0 = torch.empty(batch, dim, nstate)
    blocks = _channel_blocks(dim, threads, batch * length * dim * nstate)
    dB_parts = torch.zeros(len(blocks), *B.shape)
    dC_parts = torch.zeros(len(blocks), *C.shape)
    shared = (u, delta, A, B, C, starts, grad_y, grad_h, du, ddelta, dA)
    # every block's dB/dC part has the same count, so one array serves all blocks
    counts = _counts((*shared, dB_parts[0], dC_parts[0], dh0))

    def block_args(i):
        return [*(_ptr(t) for t in shared), dB_parts[i].data_ptr(), dC_parts[i].data_ptr(), dh0.data_ptr(),
                counts.buffer_info()[0], len(counts)]

    _run_blocks(_lib.leanseq_selective_scan_bwd, None, (batch, length, dim, nstate, chunk), threads,
                batch * length * dim * nstate, per_block_args=block_args, names=_BWD_BUFFERS)
    return du, ddelta, dA, dB_parts.sum(0), dC_parts.sum(0), dh0
