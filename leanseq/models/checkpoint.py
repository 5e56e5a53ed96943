"""Hugging Face-style checkpoint directories: config.json plus safetensors, single file or sharded.

Writes are atomic (a temporary sibling directory renamed into place) and loads are verified: every missing,
unexpected or mis-shaped tensor is reported by name with the expected and the found shape.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model."""


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a folder with config.json and safetensors")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} is missing; a checkpoint folder needs config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, from model.safetensors or the shards its index names."""
    from safetensors.torch import load_file

    path = Path(path)
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"shard {file} named in {INDEX_FILE} is missing")
        try:
            part = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"cannot read {file}: it is corrupt or not a safetensors file ({exc})") from exc
        if weight_map is not None:
            for key in part:
                if weight_map.get(key) != name:
                    raise CheckpointError(f"tensor {key!r} found in {name} but the index places it in {weight_map.get(key)}")
        tensors.update(part)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"tensors listed in {INDEX_FILE} are missing from the shards: {missing[:5]}")
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


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], optional=()) -> None:
    """Copy `tensors` into `module`, naming every missing, unexpected or mis-shaped key.

    Keys in `optional` (e.g. a tied lm_head) may be absent; they are then left as the module has them.
    """
    expected = module.state_dict()
    problems = []
    missing = [k for k in expected if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in expected]
    for k in missing:
        problems.append(f"missing tensor {k!r} (expected shape {tuple(expected[k].shape)})")
    for k in unexpected:
        problems.append(f"unexpected tensor {k!r} (found shape {tuple(tensors[k].shape)})")
    for k, v in tensors.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"tensor {k!r}: expected shape {tuple(expected[k].shape)}, found {tuple(v.shape)}")
        elif k in expected and not (v.is_floating_point() or v.dtype == expected[k].dtype):
            problems.append(f"tensor {k!r}: expected a floating-point tensor, found {v.dtype}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint does not match the model:\n  {shown}{more}")
    for k, v in tensors.items():
        if not torch.isfinite(v).all() if v.is_floating_point() else False:
            raise CheckpointError(f"tensor {k!r} holds NaN or infinite values")
    module.load_state_dict({k: v for k, v in tensors.items()}, strict=False)
