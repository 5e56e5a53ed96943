"""Files written so that a reader sees the old file or the new one, never half of one.

Standard library only, so that every room can use it: the kernel cache below the models and the torch-free edge
runtime included. Checkpoints add their own clean-up of scratch copies on top (leanseq.models.checkpoint).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_file_atomic(path: str | os.PathLike, data: bytes | str, prefix: str | None = None) -> Path:
    """Write data (bytes, or text as UTF-8) to path via a temporary sibling (mode 0600), fsync and os.replace.
    Creates the folder. `prefix` names the scratch copy (default ".NAME.tmp-"); it is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """A matplotlib figure -> path via a temporary sibling (same suffix, so savefig infers the same format) and
    os.replace: a reader never sees half an image. Creates the folder; keyword arguments go to fig.savefig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
