"""Training checkpoints: one file, written atomically and verified by a SHA-256 checksum on load.

Layout: a magic line, the hex SHA-256 of the payload, a newline, then the payload (`torch.save` of a dict
of tensors, numbers and strings). The file is written to a temporary sibling, fsynced and moved into place
with os.replace, so a crash mid-write leaves the previous checkpoint intact. Loading uses
`torch.load(weights_only=True)`: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from leanseq.fileio import write_file_atomic

MAGIC = b"LEANSEQ-TRAIN-STATE-V1\n"


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing, truncated, corrupt or belongs to a different run."""


def save_train_state(path: str | os.PathLike, state: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    return write_file_atomic(path, MAGIC + digest + b"\n" + payload)  # private (0600), as before


def load_train_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainCheckpointError(f"training checkpoint {path} does not exist")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise TrainCheckpointError(f"{path} is not a leanseq training checkpoint (bad header)")
    header_end = raw.find(b"\n", len(MAGIC))
    if header_end < 0:
        raise TrainCheckpointError(f"{path} is truncated: no checksum line")
    expected = raw[len(MAGIC) : header_end].decode("ascii", errors="replace")
    payload = raw[header_end + 1 :]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise TrainCheckpointError(
            f"{path} is corrupt: checksum {actual[:16]}... does not match the recorded {expected[:16]}..."
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum passed, so this is a format problem, not a torn write
        raise TrainCheckpointError(f"{path}: cannot read the checkpoint payload ({exc})") from exc
