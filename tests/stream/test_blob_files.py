"""State files on disk: Session.load reads a file whole only once its prefix and header vouch for it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from leanseq.stream import Session, StateBlobError
from leanseq.stream.blob import FORMAT_VERSION, MAGIC

BIG = 64 << 20  # a sparse 64 MiB tail: no disk used, but reading it would cost 64 MiB of read() calls


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


needs_proc_io = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")


@pytest.fixture
def blob(mamba):
    session = Session(mamba)
    session.push(torch.arange(5))
    return session.state_bytes()


def sparse_file(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


@needs_proc_io
@pytest.mark.parametrize("case", ["not a blob", "bad version", "header too long", "tail after the blob", "truncated"])
def test_load_refuses_a_big_bad_file_without_reading_it(tmp_path, mamba, blob, case):
    header_len = struct.unpack_from("<I", blob, 12)[0]
    if case == "not a blob":
        head = b"\x7fELF" + bytes(12)
    elif case == "bad version":
        head = MAGIC + struct.pack("<II", FORMAT_VERSION + 1, header_len)
    elif case == "header too long":
        head = MAGIC + struct.pack("<II", FORMAT_VERSION, 1 << 30)
    elif case == "tail after the blob":
        head = blob  # a whole valid blob, then 64 MiB more: the header announces a size the file exceeds
    else:
        # a header announcing a payload of 4 GiB in a file of 64 MiB
        header = json.loads(blob[16 : 16 + header_len])
        header["payload_len"] = 4 << 30
        header_bytes = json.dumps(header).encode()
        head = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header_bytes)) + header_bytes
    path = sparse_file(tmp_path / "big.lsqstate", head, BIG)
    before = bytes_read()
    with pytest.raises(StateBlobError, match=r"big\.lsqstate: (not a leanseq|state blob)"):
        Session.load(mamba, path)
    assert bytes_read() - before < (1 << 20), "the file was read before its prefix and header were checked"


def test_load_still_reads_a_good_file_and_names_a_short_one(tmp_path, mamba, blob):
    path = tmp_path / "a.lsqstate"
    path.write_bytes(blob)
    assert Session.load(mamba, path).position == 5
    for cut in (3, 12, 40, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(StateBlobError, match=r"a\.lsqstate: state blob is truncated"):
            Session.load(mamba, path)
