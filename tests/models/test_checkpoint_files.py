"""Checkpoint folders and state files on disk: what killed writers leave behind is cleaned by the next save,
and a reader loading a folder that another process keeps re-saving always gets one whole version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import leanseq
from leanseq.models import checkpoint as ckpt
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.stream import Session

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def tiny_mamba(seed: int = 0, **overrides) -> MambaLM:
    torch.manual_seed(seed)
    cfg = {"vocab_size": 50, "hidden_size": 16, "state_size": 4, "num_hidden_layers": 1}
    return MambaLM(MambaConfig(**{**cfg, **overrides})).eval()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# a writer that stops in the middle of save_pretrained (tensors written into its temporary folder, nothing
# renamed yet) and waits there to be killed
KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from leanseq.models import checkpoint
    from leanseq.models.mamba import MambaConfig, MambaLM

    real_atomic = checkpoint.atomic_write_dir

    def stalled(path, write_fn):
        def write_then_wait(tmp):
            write_fn(tmp)
            print("mid-save", flush=True)
            time.sleep(600)
        return real_atomic(path, write_then_wait)

    checkpoint.atomic_write_dir = stalled
    model = MambaLM(MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1))
    model.save_pretrained(sys.argv[1])
""")


def test_a_writer_killed_mid_save_leaves_a_temp_folder_that_the_next_save_removes(tmp_path):
    target = tmp_path / "m"
    tiny_mamba(0).save_pretrained(target)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert writer.stdout.readline().strip() == "mid-save"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    left = [n for n in names(tmp_path) if n != "m"]
    assert len(left) == 1 and left[0].startswith(f".m.tmp-{writer.pid}-"), left  # what kill -9 leaves
    assert names(target) == ["config.json", "model.safetensors"]  # the old version, whole
    # an .old copy of a dead writer (killed between its two renames, where no exchange is possible)
    old = tmp_path / f".m.old-{dead_pid()}-0a1b2c3d"
    old.mkdir()
    (old / "config.json").write_text("{}")
    tiny_mamba(1).save_pretrained(target)
    assert names(tmp_path) == ["m"]
    assert torch.equal(leanseq.load(target).lm_head.weight, tiny_mamba(1).lm_head.weight)


def test_a_live_writers_scratch_copy_is_kept_until_it_is_an_hour_old(tmp_path):
    target = tmp_path / "m"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {tmp_path / f".m.tmp-{sleeper.pid}-abc", tmp_path / f".m.tmp-{os.getpid()}-def"}
        stale = tmp_path / f".m.tmp-{sleeper.pid}-old"
        for folder in (*live, stale):
            folder.mkdir()
        hour_ago = time.time() - ckpt.LEFTOVER_MAX_AGE_S - 60
        os.utime(stale, (hour_ago, hour_ago))
        other = tmp_path / f".mm.tmp-{dead_pid()}-xyz"  # another checkpoint's: not ours to touch
        other.mkdir()
        tiny_mamba().save_pretrained(target)
        assert names(tmp_path) == sorted(["m", other.name, *(p.name for p in live)])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_state_file_temp_leftovers_are_removed_by_the_next_save(tmp_path):
    model = tiny_mamba()
    session = Session(model)
    session.push([1, 2, 3])
    path = tmp_path / "a.lsqstate"
    session.save(path)
    (tmp_path / f".a.lsqstate.tmp-{dead_pid()}-k9x").write_bytes(b"half a blob")  # as kill -9 mid-save leaves it
    (tmp_path / ".a.lsqstate.tmp-q1w2e3").write_bytes(b"an older leanseq's temp file")  # no pid: age decides
    session.push(4)
    session.save(path)
    assert names(tmp_path) == [".a.lsqstate.tmp-q1w2e3", "a.lsqstate"]
    assert Session.load(model, path).position == 4


# re-saves two versions of a model (different weights and configs) into one folder, alternately, as fast as it
# can; with "renames" it replaces the folder by two renames (as where no atomic exchange exists), leaving a
# moment with no folder at the path
RESAVER = textwrap.dedent("""
    import sys, time
    import torch
    import leanseq
    from leanseq.models import checkpoint
    torch.set_num_threads(1)
    if sys.argv[5] == "renames":
        checkpoint._exchange = lambda a, b: False
    versions = [leanseq.load(sys.argv[1]), leanseq.load(sys.argv[2])]
    target, until = sys.argv[3], time.monotonic() + float(sys.argv[4])
    saves = 0
    print("ready", flush=True)
    while time.monotonic() < until:
        versions[saves % 2].save_pretrained(target)
        saves += 1
    print(saves, flush=True)
""")


@pytest.mark.parametrize("replace", ["exchange", "renames"])
def test_loading_while_another_process_resaves_always_gets_one_whole_version(tmp_path, replace):
    torch.set_num_threads(1)  # two processes on a small CI box; restored below
    versions = [tiny_mamba(0), tiny_mamba(1, layer_norm_epsilon=1e-2)]
    for i, model in enumerate(versions):
        model.save_pretrained(tmp_path / f"v{i}")
    target = tmp_path / "m"
    versions[0].save_pretrained(target)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [m(ids) for m in versions]
    resaver = subprocess.Popen(
        [sys.executable, "-c", RESAVER, str(tmp_path / "v0"), str(tmp_path / "v1"), str(target), "3", replace],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert resaver.stdout.readline().strip() == "ready"
    loads, failures, seen = 0, [], set()
    while resaver.poll() is None:
        try:
            model = leanseq.load(target)
        except Exception as exc:  # noqa: BLE001 -- every failure counts
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        with torch.no_grad():
            logits = model(ids)
        match = [i for i, e in enumerate(expected) if torch.equal(logits, e)]
        if not match:
            failures.append("logits of neither saved version: config and tensors of different saves")
        seen.update(match)
        loads += 1
    out, err = resaver.communicate()
    assert resaver.returncode == 0, err
    saves = int(out.split()[-1])
    assert saves > 20 and loads > 20, (saves, loads)
    assert not failures, f"{len(failures)} of {loads + len(failures)} loads failed: {failures[:3]}"
    assert seen == {0, 1}  # the loads really did see both versions
    assert names(tmp_path) == ["m", "v0", "v1"]


@pytest.fixture(autouse=True)
def _threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
