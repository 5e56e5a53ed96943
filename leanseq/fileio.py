"""Files written so that a reader sees the old file or the new one, never half of one.

Standard library only, so that every room can use it: the kernel cache below the models and the torch-free edge
runtime included. Checkpoints add their own clean-up of scratch copies on top (leanseq.models.checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """Where leanseq keeps what it builds or trains once (compiled kernels, trained models): $LEANSEQ_CACHE, else
    ~/.cache/leanseq."""
    return Path(os.environ.get("LEANSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "leanseq"))


PRIVATE = 0o600  # only the owner reads it (checkpoints, states, the kernel cache)
SHARED = 0o666  # what open() gives a new file: 0644 under the usual umask (reports, figures, data, tokenizers)


def _scratch_file(folder: Path, prefix: str, suffix: str, mode: int) -> str:
    """Create a new empty file with a random name in `folder`, with `mode` less the umask (tempfile.mkstemp
    always makes 0600, which would turn a report or a data file private)."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"no free scratch name for {prefix}*{suffix} in {folder}")


@contextlib.contextmanager
def _replacing(path: Path, prefix: str, suffix: str = "", mode: int = PRIVATE) -> Iterator[str]:
    """Yield a fresh scratch file (mode `mode` less the umask) beside `path`; after the block, rename it over
    `path`. If the block fails, the scratch file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_file(path.parent, prefix, suffix, mode)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file_atomic(path: str | os.PathLike, data: bytes | str, prefix: str | None = None,
                      mode: int = PRIVATE) -> Path:
    """Write data (bytes, or text as UTF-8) to path via a temporary sibling, fsync and os.replace. Creates the
    folder. The file gets `mode` less the umask: PRIVATE (0600) by default, SHARED for what open() would write.
    `prefix` names the scratch copy (default ".NAME.tmp-"); it is removed if writing fails."""
    path = Path(path)
    with _replacing(path, prefix or f".{path.name}.tmp-", mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """A matplotlib figure -> path via a temporary sibling (same suffix, so savefig infers the same format) and
    os.replace: a reader never sees half an image. Creates the folder; keyword arguments go to fig.savefig.
    The image gets the mode open() would give it (SHARED less the umask)."""
    path = Path(path)
    with _replacing(path, f".{path.stem}.tmp-", path.suffix, mode=SHARED) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path
