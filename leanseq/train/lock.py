"""An exclusive lock on a training run's output folder, so two runs never write the same checkpoint.

The lock is `<output dir>/.lock`, held with an OS advisory lock (flock on POSIX, msvcrt.locking on Windows)
for as long as the run writes there. The OS drops such a lock when the holding process exits, however it
exits (kill -9 included), so a dead run never leaves a stale lock behind; the file itself stays and only
records the holder's pid for the message the next run prints.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"
# errors that mean "this filesystem cannot lock" (some network filesystems), not "someone else holds it"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class OutputDirBusyError(OSError):
    """Another process holds the lock on a training run's output folder."""


def _try_lock(fh) -> bool:
    """Take the lock without waiting: True when taken, False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt  # pragma: no cover - Windows

    fh.seek(0)  # pragma: no cover
    try:  # pragma: no cover
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


class OutputDirLock:
    """Non-blocking exclusive lock on `folder`: `acquire()` raises OutputDirBusyError naming the folder and
    the holder's pid when another process (or another OutputDirLock in this one) holds it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # held open until release(); "a+" never truncates before the lock is ours (the holder's pid is in there)
        fh = open(self.path, "a+")  # noqa: SIM115
        try:
            taken = _try_lock(fh)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                fh.close()
                raise
            warnings.warn(f"cannot lock {self.path} ({exc.strerror}); nothing stops a second run from writing "
                          f"to {self.folder} at the same time", stacklevel=2)
            taken = True
        if not taken:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise OutputDirBusyError(
                f"output folder {self.folder} is in use by another training run (pid {holder}, holding "
                f"{self.path}); wait for it to finish or stop it, or choose another output.dir"
            )
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._file = fh

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None
