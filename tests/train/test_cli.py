import json
from pathlib import Path

import leanseq
from leanseq.cli import main

EXAMPLE = str(Path(leanseq.__file__).parent / "configs" / "induction_mamba.toml")


def test_leanseq_train_runs_the_example_config_with_overrides(tmp_path, capsys):
    rc = main([
        "train", "--config", EXAMPLE, "--set", "model.d_model=8", "--set", "model.n_layers=1",
        "--set", "task.seq_len=8", "--set", "train.steps=2", "--set", "train.eval_batches=1",
        "--set", f"output.dir={json.dumps(str(tmp_path))}", "--set", "output.progress=false",
        "--set", "output.save_model=false",
    ])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["output_dir"] == str(tmp_path)
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "metrics.jsonl").exists()


def test_leanseq_train_names_a_mistyped_key(capsys):
    assert main(["train", "--config", EXAMPLE, "--set", "train.stesp=3"]) == 1
    assert "train.stesp: unknown key; did you mean train.steps?" in capsys.readouterr().err
