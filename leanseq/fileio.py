"""Files written so that a reader sees the old file or the new one, never half of one.

Standard library only, so that every room can use it: the kernel cache below the models and the torch-free edge
runtime included. Checkpoints add their own clean-up of scratch copies on top (leanseq.models.checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def _replacing(path: Path, prefix: str, suffix: str = "") -> Iterator[str]:
    """Yield a fresh scratch file (mode 0600) beside `path`; after the block, rename it over `path`. If the block
    fails, the scratch file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file_atomic(path: str | os.PathLike, data: bytes | str, prefix: str | None = None) -> Path:
    """Write data (bytes, or text as UTF-8) to path via a temporary sibling (mode 0600), fsync and os.replace.
    Creates the folder. `prefix` names the scratch copy (default ".NAME.tmp-"); it is removed if writing fails."""
    path = Path(path)
    with _replacing(path, prefix or f".{path.name}.tmp-") as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """A matplotlib figure -> path via a temporary sibling (same suffix, so savefig infers the same format) and
    os.replace: a reader never sees half an image. Creates the folder; keyword arguments go to fig.savefig."""
    path = Path(path)
    with _replacing(path, f".{path.stem}.tmp-", path.suffix) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path
