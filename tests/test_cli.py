"""`leanseq` prints one line for a bad input (exit 1) and the traceback only with --debug."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import leanseq
from leanseq.cli import main

EXAMPLE = str(Path(leanseq.__file__).parent / "configs" / "induction_mamba.toml")
REPO = str(Path(leanseq.__file__).resolve().parents[1])


def _train_args(out_dir, *extra) -> list[str]:
    return ["train", "--set", "model.family=mamba", "--set", "model.d_model=8", "--set", "model.n_layers=1",
            "--set", "task.name=induction_heads", "--set", "task.seq_len=8", "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "train.eval_batches=1", "--set", "train.eval_batch_size=2",
            "--set", f"output.dir={json.dumps(str(out_dir))}", "--set", "output.progress=false",
            "--set", "output.save_model=false", *extra]


def _single_error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "argv,prefix,message",
    [
        (["train", "--config", "no/such.toml"], "leanseq train", "config file no/such.toml does not exist"),
        (["train", "--config", EXAMPLE, "--set", "train.lr=nan"], "leanseq train",
         "train.lr: must be a finite positive number, got nan"),
        (["train", "--config", EXAMPLE, "--set", "train.grad_clip=nan"], "leanseq train", "train.grad_clip"),
        (["train", "--config", EXAMPLE, "--set", "model.d_model=-4"], "leanseq train", "hidden_size"),
        (["generate", "--model", "no/such/folder"], "leanseq generate", "no/such/folder"),
        (["generate", "--ids", "--prompt", "1 x"], "leanseq generate", "--prompt"),
        (["bench", "context", "--quick", "--len-factor", "1"], "leanseq bench context", "--len-factor"),
        (["repro", "induction", "--quick", "--models", "nope"], "leanseq repro induction", "--models"),
    ],
)
def test_a_bad_input_prints_one_line_naming_the_problem(argv, prefix, message, capsys):
    assert main(argv) == 1
    assert message in _single_error_line(capsys, prefix)


def test_bad_toml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    assert main(["train", "--config", str(bad)]) == 1
    assert "is not valid TOML" in _single_error_line(capsys, "leanseq train")


def test_a_nan_loss_stops_training_with_one_line(tmp_path, capsys):
    assert main(_train_args(tmp_path, "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
                            "--set", "train.steps=20", "--set", "train.grad_clip=0")) == 1
    assert "NaN or infinite" in _single_error_line(capsys, "leanseq train")


def test_an_unexpected_exception_is_one_line_that_points_to_debug(monkeypatch, capsys):
    import leanseq.train.trainer

    def broken(config):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(leanseq.train.trainer, "run", broken)
    assert main(["train", "--config", EXAMPLE]) == 1
    line = _single_error_line(capsys, "leanseq train")
    assert line.endswith("unexpected RuntimeError: first line second line (run again with --debug for the traceback)")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback(where):
    argv = ["train", "--config", "no/such.toml"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(argv)
    with pytest.raises(ValueError, match="--len-factor"):
        main(["--debug", "bench", "context", "--quick", "--len-factor", "1"] if where == "before"
             else ["bench", "context", "--quick", "--len-factor", "1", "--debug"])


def test_generate_refuses_a_non_positive_thread_count_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--threads", "-1"])
    assert info.value.code == 2
    assert "argument --threads: expected a positive integer, got '-1'" in capsys.readouterr().err


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import leanseq.train.trainer

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(leanseq.train.trainer, "run", interrupted)
    assert main(["train", "--config", EXAMPLE]) == 130
    assert capsys.readouterr().err == ""


def test_a_busy_output_folder_is_one_line(tmp_path, capsys):
    from leanseq.train.lock import OutputDirLock

    lock = OutputDirLock(tmp_path)
    lock.acquire()
    try:
        assert main(_train_args(tmp_path)) == 1
    finally:
        lock.release()
    assert f"output folder {tmp_path} is in use by another training run" in _single_error_line(capsys, "leanseq train")


def test_resume_warnings_and_refusals_are_one_line_each(tmp_path, capsys):
    assert main(_train_args(tmp_path)) == 0
    capsys.readouterr()
    assert main(_train_args(tmp_path, "--set", "train.steps=3")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warning) == 1 and warning[0].startswith("leanseq train: warning: resuming ")
    assert "train.steps: 2 -> 3" in warning[0]
    assert main(_train_args(tmp_path, "--set", "train.steps=4", "--set", "train.seed=5")) == 1
    assert "train.seed: 0 -> 5" in _single_error_line(capsys, "leanseq train")


def _leanseq(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "leanseq.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_a_real_process_prints_one_line_and_with_debug_the_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nfamily = "mamba"\n[task]\nname = "induction_heads"\n[train]\nweight_decay = inf\n')
    plain = _leanseq("train", "--config", str(bad))
    assert plain.returncode == 1
    assert plain.stderr == "leanseq train: error: train.weight_decay: must be a finite number >= 0, got inf\n"
    debug = _leanseq("--debug", "train", "--config", str(bad))
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.rstrip().endswith("ConfigError: train.weight_decay: must be a finite number >= 0, got inf")


@pytest.mark.parametrize(("group", "first"), [("bench", "context"), ("repro", "induction"), ("lm", "race"),
                                              ("dna", "classify"), ("series", "classify")])
def test_a_command_group_alone_prints_its_subcommands_and_exits_2(capsys, group, first):
    assert main([group]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"usage: leanseq {group}") and first in out
