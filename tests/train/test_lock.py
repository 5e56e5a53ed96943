import json
import os
import signal
import subprocess
import sys
import time

import pytest

from leanseq.train import load_config, run
from leanseq.train.lock import OutputDirBusyError, OutputDirLock

fcntl = pytest.importorskip("fcntl")

# Another process holding the documented lock: flock on <output dir>/.lock with its pid inside.
HOLDER = """
import fcntl, os, sys, time
fh = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
fh.seek(0); fh.truncate(); fh.write(f"{os.getpid()}\\n"); fh.flush()
print("locked", flush=True)
time.sleep(600)
"""


def _overrides(out_dir) -> list[str]:
    return [
        "model.family=mamba", "model.d_model=8", "model.n_layers=1", "model.state_size=4",
        "task.name=induction_heads", "task.seq_len=8", "train.steps=2", "train.batch_size=2",
        "train.eval_batches=1", "train.eval_batch_size=2", f"output.dir={json.dumps(str(out_dir))}",
        "output.progress=false", "output.save_model=false",
    ]


def test_a_second_run_on_a_locked_output_folder_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusyError) as info:
            run(load_config(None, _overrides(tmp_path)))
        message = str(info.value)
        assert f"output folder {tmp_path} is in use" in message and f"pid {holder.pid}" in message
        assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without any cleanup, as after kill -9
        holder.wait()
    assert run(load_config(None, _overrides(tmp_path)))["step"] == 2
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())  # the last holder's pid is recorded


def test_the_lock_is_released_when_the_run_ends_even_on_error(tmp_path):
    assert run(load_config(None, _overrides(tmp_path)))["step"] == 2
    with OutputDirLockHeld(tmp_path):  # released: another holder can take it now
        pass
    with pytest.raises(ValueError):  # fails inside load_checkpoint (another task) ...
        run(load_config(None, [*_overrides(tmp_path), "task.seq_len=9"]))
    with OutputDirLockHeld(tmp_path):  # ... and does not keep the folder locked
        pass


def test_two_trainers_in_one_process_exclude_each_other(tmp_path):
    from leanseq.train import build_trainer

    config = load_config(None, _overrides(tmp_path))
    run(config)
    first = build_trainer(load_config(None, [*_overrides(tmp_path), "train.steps=3"]))  # resumes: holds the lock
    second = build_trainer(load_config(None, [*_overrides(tmp_path), "output.resume=false"]))
    with pytest.raises(OutputDirBusyError, match=f"pid {os.getpid()}"):
        second.fit()
    assert first.fit()["step"] == 3
    assert second.fit()["step"] == 2  # free again once the first run ended


class OutputDirLockHeld:
    def __init__(self, folder):
        self.lock = OutputDirLock(folder)

    def __enter__(self):
        self.lock.acquire()
        return self.lock

    def __exit__(self, *exc):
        self.lock.release()


def test_lock_waits_for_nobody(tmp_path):
    first = OutputDirLock(tmp_path)
    first.acquire()
    start = time.perf_counter()
    with pytest.raises(OutputDirBusyError, match=str(tmp_path)):
        OutputDirLock(tmp_path).acquire()
    assert time.perf_counter() - start < 1.0  # non-blocking
    first.release()
    OutputDirLock(tmp_path).acquire()
