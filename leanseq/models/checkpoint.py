"""Hugging Face-style checkpoint directories: config.json plus safetensors, single file or sharded.

Writes are atomic (a temporary sibling directory renamed into place) and loads are verified: every missing,
unexpected or mis-shaped tensor is reported by name with the expected and the found shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


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


def atomic_write_dir(path: str | os.PathLike, write_fn) -> Path:
    """Run write_fn(tmp_dir) and move the result to `path` in one rename, so a crash leaves no half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; a checkpoint is an ordinary folder
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_checkpoint(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / SINGLE_FILE), metadata={"format": "pt"})

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
