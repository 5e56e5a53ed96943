"""leanseq.fileio: a reader sees the old file or the new one, and a failed write leaves no scratch copy."""
import pytest

from leanseq.fileio import save_figure_atomic, write_file_atomic


def test_write_file_atomic_writes_text_and_bytes_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "a.json"
    assert write_file_atomic(path, "é\n") == path
    assert path.read_bytes() == "é\n".encode()
    write_file_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


class _FailingFigure:
    def savefig(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half a png")
        raise RuntimeError("disk full")


class _Figure:
    def __init__(self):
        self.calls = []

    def savefig(self, target, **kwargs):
        self.calls.append((str(target), kwargs))
        with open(target, "wb") as f:
            f.write(b"png")


def test_save_figure_atomic_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure_atomic(_FailingFigure(), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_save_figure_atomic_saves_through_a_sibling_with_the_same_suffix(tmp_path):
    fig, path = _Figure(), tmp_path / "sub" / "plot.png"
    assert save_figure_atomic(fig, path, dpi=120) == path
    (target, kwargs), = fig.calls
    assert target.endswith(".png") and target != str(path) and kwargs == {"dpi": 120}
    assert path.read_bytes() == b"png" and [p.name for p in path.parent.iterdir()] == ["plot.png"]


def test_modes_private_by_default_shared_as_open_would_write(tmp_path):
    """Checkpoints and states stay the owner's (0600); reports, figures and data files get what open() gives a
    new file, the umask applied (0644 under umask 022), not tempfile's 0600."""
    import os
    import stat

    from leanseq.fileio import SHARED

    old = os.umask(0o022)
    try:
        private = write_file_atomic(tmp_path / "state.bin", b"x")
        shared = write_file_atomic(tmp_path / "report.md", "x", mode=SHARED)
        figure = save_figure_atomic(_Figure(), tmp_path / "plot.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(figure.stat().st_mode) == 0o644
