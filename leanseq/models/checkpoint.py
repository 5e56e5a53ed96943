"""Hugging Face-style checkpoint directories: config.json plus safetensors, single file or sharded.

Writes are atomic (a temporary sibling directory renamed into place) and loads are verified: every missing,
unexpected or mis-shaped tensor is reported by name with the expected and the found shape.

Replacing a checkpoint that other processes read is safe: on Linux the new folder and the old one swap
places in one rename (renameat2 RENAME_EXCHANGE; elsewhere two renames), and `read_consistently` reads every
file through one pinned directory, so a reader gets one whole version, never a mix and never "missing".
Scratch copies that a killed writer leaves behind (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) are removed by the
next save once their writer is dead (or, whatever the pid says, after LEFTOVER_MAX_AGE_S).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path

import torch

from leanseq import fileio

try:
    import fcntl
except ImportError:  # not on Windows: replaced versions are then deleted at once and readers retry
    fcntl = None

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# a scratch copy older than this is removed even when its pid is alive: no save takes an hour, and pids get reused
LEFTOVER_MAX_AGE_S = 3600.0
_READ_ATTEMPTS = 20
READER_GRACE_S = 60.0  # how long a writer waits for readers of the version it replaced before leaving it  # a reader retries when the version it pinned was deleted before it could open a file


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model."""


# config.json and the index are a few kilobytes; a larger one is not what it claims to be
MAX_JSON_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says about one tensor, known before any of its data is read."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, I64, ...
    file: Path

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("F", "BF"))  # F8_*, F16, F32, F64, BF16


def _open_regular_file(file: Path, what: str) -> int:
    """A descriptor of `file`, refused unless it is a regular file: a FIFO would block the read forever and a
    device like /dev/zero never ends. O_NONBLOCK keeps the open itself from blocking on a FIFO."""
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing; {what}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot open {file}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{file} is not a regular file; {what}")
    return fd


def _read_json(file: Path, what: str):
    fd = _open_regular_file(file, what)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{file} is larger than {MAX_JSON_BYTES // 2**20} MiB; {what}")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a folder with config.json and safetensors")
    config = _read_json(path / CONFIG_FILE, "a checkpoint folder needs config.json (a regular file)")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG_FILE} must hold a JSON object, found {type(config).__name__}")
    return config


def _plain_file_name(name: str) -> bool:
    return (name not in ("", ".", "..") and Path(name).name == name and not os.path.isabs(name)
            and not any(c in name for c in "/\\\0"))


def _shard_files(path: Path) -> tuple[dict[str, str] | None, list[Path]]:
    """(the index's weight map or None, the safetensors files to read), each file checked to lie in `path`."""
    index_path = path / INDEX_FILE
    if index_path.exists() or index_path.is_symlink():
        index = _read_json(index_path, "a safetensors index must be a regular file")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index: it needs a \"weight_map\" object mapping each "
                f"tensor name to a shard file name, found {type(weight_map).__name__}"
            )
        # Shards are looked for beside the index as it really lies: the same folder, or for huggingface_hub's
        # cache (snapshot files are symlinks into blobs/) the folder both the index and its shards link into.
        home = index_path.resolve().parent
        files = []
        for name in sorted(set(weight_map.values())):
            if not _plain_file_name(name):
                raise CheckpointError(
                    f"{index_path} names shard {name!r}; a shard must be a plain file name inside the checkpoint "
                    "folder (no path separators, '..' or absolute paths)"
                )
            file = path / name
            if not file.exists():
                raise CheckpointError(f"shard {file} named in {INDEX_FILE} is missing")
            if file.resolve().parent != home:
                raise CheckpointError(
                    f"shard {file} named in {INDEX_FILE} links to {file.resolve()}, outside the checkpoint folder"
                )
            files.append(file)
        return weight_map, files
    if (path / SINGLE_FILE).exists() or (path / SINGLE_FILE).is_symlink():
        return None, [path / SINGLE_FILE]
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_headers(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Name, shape and dtype of every tensor of a checkpoint folder, from the safetensors headers alone.

    safetensors validates each header against its file's size (offsets in bounds, byte counts equal to
    shape x dtype), so what is returned here bounds what reading the data can cost.
    """
    from safetensors import safe_open

    path = Path(path)
    weight_map, files = _shard_files(path)
    headers: dict[str, TensorHeader] = {}
    for file in files:
        os.close(_open_regular_file(file, "a safetensors file must be a regular file"))
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    info = f.get_slice(key)
                    headers[key] = TensorHeader(tuple(info.get_shape()), info.get_dtype(), file)
                    if weight_map is not None and weight_map.get(key) != file.name:
                        raise CheckpointError(
                            f"tensor {key!r} found in {file.name} but the index places it in {weight_map.get(key)}"
                        )
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"cannot read {file}: it is corrupt or not a safetensors file ({exc})") from exc
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(headers))
        if missing:
            raise CheckpointError(f"tensors listed in {INDEX_FILE} are missing from the shards: {missing[:5]}")
    return headers


def read_tensors(path: str | os.PathLike, headers: dict[str, TensorHeader] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, from model.safetensors or the shards its index names.

    `headers` (from read_headers) saves reading them again; a file that changed since is refused.
    """
    from safetensors.torch import load_file

    if headers is None:
        headers = read_headers(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({h.file for h in headers.values()}):
        try:
            part = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read {file}: it is corrupt or not a safetensors file ({exc})") from exc
        for key, tensor in part.items():
            header = headers.get(key)
            if header is None or header.file != file or tuple(tensor.shape) != header.shape:
                raise CheckpointError(f"{file} changed while it was being loaded (tensor {key!r}); load it again")
        tensors.update(part)
    if len(tensors) != len(headers):
        raise CheckpointError(f"{path} changed while it was being loaded (tensors went missing); load it again")
    return tensors


# ---- scratch copies of writers ----------------------------------------------------------------------------
def scratch_prefix(path: Path, kind: str) -> str:
    """Name prefix of this process's scratch copies of `path`: ".NAME.tmp-PID-" (being written) or ".NAME.old-PID-"
    (the replaced version, being deleted). The pid tells a later save whether the writer is still alive."""
    return f".{path.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap liveness check: rely on the age limit alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete the scratch copies of `path` that writers killed mid-save left next to it; return what was removed.

    One is removed when its writer's pid is no longer running (kill -9, power loss) or when it is older than
    LEFTOVER_MAX_AGE_S; a live writer's copy (this process's included) is left alone. Best effort: a copy that
    cannot be removed (permissions, a concurrent remover) is skipped.
    """
    path = Path(path)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        for kind in ("tmp", "old"):
            stem = f".{path.name}.{kind}-"
            if entry.name.startswith(stem):
                break
        else:
            continue
        pid_text = entry.name[len(stem) :].split("-", 1)[0]
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        writer_dead = pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
        if not (writer_dead or age > LEFTOVER_MAX_AGE_S):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed



def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write data (bytes, or text as UTF-8) to path via a temporary sibling, fsync and os.replace: readers see
    the old file or the new one. Creates the folder; first removes scratch copies that earlier writers, killed
    mid-save, left next to `path` (see remove_leftovers)."""
    path = Path(path)
    remove_leftovers(path)
    return fileio.write_file_atomic(path, data, prefix=scratch_prefix(path, "tmp"))

def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the kernel or file system cannot exchange
        return False
    raise OSError(errno, f"cannot exchange {a} and {b}: {os.strerror(errno)}")


_LIBC: list = []


def _libc():
    if not _LIBC:
        name = ctypes.util.find_library("c") if os.name == "posix" else None
        try:
            _LIBC.append(ctypes.CDLL(name, use_errno=True) if name else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


# ---- readers and writers ------------------------------------------------------------------------------------
def read_consistently(path: str | os.PathLike, read_fn):
    """read_fn(folder) over one whole version of the checkpoint folder `path`, even while another process
    replaces it: the folder is opened once and (on Linux, through /proc/self/fd) every file is read from that
    opened folder, wherever it is renamed meanwhile. When that version is deleted before read_fn has opened its
    files, or the path is briefly absent mid-replacement, the read starts again on the new version. Errors
    name `path`, not the pinned folder."""
    path = Path(path)
    for attempt in range(_READ_ATTEMPTS):
        final = attempt == _READ_ATTEMPTS - 1
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            if not final and _being_replaced(path):
                time.sleep(0.005 * (attempt + 1))
                continue
            return read_fn(path)  # nothing to pin: read_fn reports what is (not) there
        try:
            if fcntl is not None:
                try:  # a shared lock: the writer that replaces this version deletes it only after we are done
                    fcntl.flock(fd, fcntl.LOCK_SH)
                except OSError:
                    pass
            pinned = Path(f"/proc/self/fd/{fd}")
            through_fd = pinned.is_dir()
            try:
                result = read_fn(pinned if through_fd else path)
            except Exception as exc:
                if not final and _replaced_since(path, fd):
                    continue  # the version read was swapped out or deleted mid-read
                if through_fd:
                    _rename_in_message(exc, str(pinned), str(path))
                raise
            if through_fd or not _replaced_since(path, fd):
                return result
        finally:
            os.close(fd)
    raise CheckpointError(f"{path} was replaced while being read, {_READ_ATTEMPTS} times in a row; try again")


def _rename_in_message(exc: BaseException, old: str, new: str) -> None:
    """Make an error raised while reading through the pinned folder name the folder the caller asked for."""
    try:
        exc.args = tuple(a.replace(old, new) if isinstance(a, str) else a for a in exc.args)
    except (AttributeError, TypeError):
        pass


def _replaced_since(path: Path, fd: int) -> bool:
    """Whether `path` no longer names the folder opened as fd (renamed away, deleted or replaced)."""
    pinned = os.fstat(fd)
    try:
        now = os.stat(path)
    except OSError:
        return True
    return pinned.st_nlink == 0 or (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino)


def _being_replaced(path: Path) -> bool:
    """Whether a writer's scratch copy of `path` exists next to it (so a missing `path` may be mid-rename)."""
    try:
        return any(e.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-")) for e in path.parent.iterdir())
    except OSError:
        return False


def _remove_when_unread(old: Path) -> None:
    """Delete a replaced version once no reader holds it: readers (read_consistently) keep a shared flock on the
    folder they pinned, so its files are not deleted under them mid-read. After READER_GRACE_S the folder is
    left for the next save's remove_leftovers rather than waiting on a stuck reader."""
    try:
        fd = os.open(old, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        deadline = time.monotonic() + READER_GRACE_S
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return  # a reader still holds it: the next save removes it (remove_leftovers)
                time.sleep(0.005)
            except OSError:
                break  # a filesystem without flock: delete at once, readers retry (read_consistently)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(fd)


def atomic_write_dir(path: str | os.PathLike, write_fn) -> Path:
    """Run write_fn(tmp_dir) and move the result to `path` in one rename, so a crash leaves no half checkpoint.

    An existing folder is swapped out atomically where the platform can (readers never find `path` missing),
    and scratch copies left by earlier, killed writers are removed first (see remove_leftovers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix(path, "tmp"), dir=path.parent))
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; a checkpoint is an ordinary folder
        for f in tmp.iterdir():
            if f.is_dir() and not f.is_symlink():  # a nested checkpoint (written, fsynced, by its own atomic write)
                os.chmod(f, 0o777 & ~umask)
                continue
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            _remove_when_unread(tmp)  # tmp now holds the replaced version
        elif path.exists():
            old = path.with_name(scratch_prefix(path, "old") + secrets.token_hex(4))
            os.replace(path, old)
            os.replace(tmp, path)
            _remove_when_unread(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_generation_config(path: str | os.PathLike) -> dict | None:
    """generation_config.json of a checkpoint folder as a dict, or None when the folder has none."""
    file = Path(path) / GENERATION_CONFIG_FILE
    if not (file.exists() or file.is_symlink()):
        return None
    data = _read_json(file, "generation_config.json must be a regular file")
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def write_checkpoint(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                     generation_config: dict | None = None, extra_writer=None) -> Path:
    """config.json + model.safetensors (+ generation_config.json), written atomically as one folder.

    extra_writer(tmp_folder), if given, adds more files (e.g. a tokenizer's) inside the same atomic write.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if generation_config is not None:
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config, indent=2, sort_keys=True) + "\n")
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        if extra_writer is not None:
            extra_writer(tmp)

    return atomic_write_dir(path, write)


def _report_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                     wrong_dtype: dict[str, str], optional=()) -> None:
    """Raise one CheckpointError naming every missing, unexpected, mis-shaped or wrongly typed tensor.

    expected / found: name -> shape; wrong_dtype: name -> the found dtype, for tensors whose dtype cannot load.
    """
    problems = []
    for k, shape in expected.items():
        if k not in found and k not in optional:
            problems.append(f"missing tensor {k!r} (expected shape {shape})")
    for k, shape in found.items():
        if k not in expected:
            problems.append(f"unexpected tensor {k!r} (found shape {shape})")
    for k, shape in found.items():
        if k in expected and shape != expected[k]:
            problems.append(f"tensor {k!r}: expected shape {expected[k]}, found {shape}")
        elif k in wrong_dtype:
            problems.append(f"tensor {k!r}: expected a floating-point tensor, found {wrong_dtype[k]}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint does not match the model:\n  {shown}{more}")


def check_headers(module: torch.nn.Module, headers: dict[str, TensorHeader], optional=()) -> None:
    """Compare `module`'s tensors (a model built on the meta device will do) with a checkpoint's headers."""
    expected = module.state_dict()
    _report_mismatch(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: h.shape for k, h in headers.items()},
        {k: h.dtype for k, h in headers.items()
         if k in expected and expected[k].is_floating_point() and not h.is_floating_point},
        optional,
    )


def _aliases(module: torch.nn.Module) -> list[list[str]]:
    """Groups of names that share one parameter or buffer (a tied lm_head and its embedding)."""
    groups: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], optional=(),
                           assign: bool = False) -> None:
    """Copy `tensors` into `module`, naming every missing, unexpected or mis-shaped key.

    Keys in `optional` (e.g. a tied lm_head) may be absent; they are then left as the module has them.
    With assign=True the module takes the tensors themselves (no copy: for a module built on the meta device),
    and names sharing one tensor (a tied lm_head) are tied again to the one not in `optional`.
    """
    expected = module.state_dict()
    _report_mismatch(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: str(v.dtype) for k, v in tensors.items()
         if k in expected and not (v.is_floating_point() or v.dtype == expected[k].dtype)},
        optional,
    )
    for k, v in tensors.items():
        if not torch.isfinite(v).all() if v.is_floating_point() else False:
            raise CheckpointError(f"tensor {k!r} holds NaN or infinite values")
    aliases = _aliases(module) if assign else []
    module.load_state_dict({k: v for k, v in tensors.items()}, strict=False, assign=assign)
    for names in aliases:
        source = next((n for n in names if n not in optional), names[0])
        try:
            tensor = module.get_parameter(source)
        except AttributeError:
            tensor = module.get_buffer(source)
        for name in names:
            if name != source:
                owner, _, attr = name.rpartition(".")
                setattr(module.get_submodule(owner), attr, tensor)
    unset = [k for k, v in module.state_dict().items() if v.is_meta]
    if unset:
        raise CheckpointError(f"checkpoint does not match the model: tensors {unset[:5]} have no value")
