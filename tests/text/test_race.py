import itertools
import json

import pytest

from leanseq import cli
from leanseq.text import race
from leanseq.text.race import quick_settings, run_race

TEXT = ("ROMEO. But soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 30)


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "bytes"
    folder.mkdir()
    (folder / "train.txt").write_text(TEXT)
    (folder / "validation.txt").write_text(TEXT[::-1])
    return str(folder)


def fake_cpu_clock(step=0.1):
    """Process time that advances 0.1 s per reading: each metered training step costs 0.675 J (6.75 W)."""
    counter = itertools.count()
    return lambda: next(counter) * step


def meter(**extra):
    return {"backend": "estimate", "cpu_watts": 6.75, "cpu_clock": fake_cpu_clock(), **extra}


def tiny(source, **overrides):
    base = {"source": source, "seq_len": 16, "batch_size": 2, "eval_batches": 1, "eval_batch_size": 2,
            "budget_joules": 2.0, "slices": 2}
    return quick_settings(**{**base, **overrides})


def test_race_spends_equal_budgets_alternating_and_writes_its_files(tmp_path, source):
    out = tmp_path / "race"
    state = run_race(tiny(source), out, progress=False, log=lambda m: None, meter_kwargs=meter())
    for name in ("ssm", "transformer"):
        p = state["models"][name]["progress"]
        assert p["done"]
        # each step is 0.675 J: the budget of 2 J is reached at the 3rd step, never more than one step over
        assert p["steps"] == 3 and p["joules"] == pytest.approx(3 * 0.675)
        assert [pt["slice"] for pt in p["points"]] == [0, 1, 2]
        assert p["points"][0]["steps"] == 0 and 7.0 < p["points"][0]["eval_bits_per_byte"] < 9.0
        assert (out / name / "model" / "config.json").is_file()
        assert (out / name / "model" / "tokenizer_config.json").is_file()
        checkpoints = sorted(x.name for x in (out / name).glob("checkpoint-*.pt"))
        assert checkpoints == [p["checkpoint"]]  # the previous slice's checkpoint is removed
    assert state["models"]["ssm"]["family"] == "mamba"
    on_disk = json.loads((out / "race.json").read_text())
    assert on_disk["models"]["transformer"]["progress"]["steps"] == 3
    table = (out / "race.md").read_text()
    assert "val bpb" in table and "lower at equal energy" in table and "estimated" in table
    assert (out / "race.png").stat().st_size > 1000


def test_race_resumes_after_an_interruption(tmp_path, source, monkeypatch):
    out = tmp_path / "race"
    settings = tiny(source, slices=3, budget_joules=3.0)
    calls = {"n": 0}
    original = race._Side.evaluate

    def interrupted(self, meter):
        calls["n"] += 1
        if calls["n"] == 4:  # after both starting points and one trained slice
            raise KeyboardInterrupt
        return original(self, meter)

    monkeypatch.setattr(race._Side, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_race(settings, out, progress=False, log=lambda m: None, meter_kwargs=meter())
    partial = json.loads((out / "race.json").read_text())["models"]
    done_points = {n: len(m["progress"]["points"]) for n, m in partial.items()}
    assert sorted(done_points.values()) == [1, 2]
    monkeypatch.setattr(race._Side, "evaluate", original)
    state = run_race(settings, out, progress=False, log=lambda m: None, meter_kwargs=meter())
    for name, model in state["models"].items():
        p = model["progress"]
        assert p["done"] and [pt["slice"] for pt in p["points"]] == [0, 1, 2, 3]
        assert p["points"][: done_points[name]] == partial[name]["progress"]["points"]  # kept, not redone
        assert p["joules"] >= 3.0
    again = run_race(settings, out, progress=False, log=lambda m: None, meter_kwargs=meter())
    assert again["models"]["ssm"]["progress"]["steps"] == state["models"]["ssm"]["progress"]["steps"]


def test_resume_with_other_settings_is_refused(tmp_path, source):
    out = tmp_path / "race"
    run_race(tiny(source), out, progress=False, log=lambda m: None, meter_kwargs=meter())
    with pytest.raises(ValueError, match="budget of 2.0 J"):
        run_race(tiny(source, budget_joules=5.0), out, progress=False, log=lambda m: None, meter_kwargs=meter())
    with pytest.raises(ValueError, match="seq_len"):
        run_race(tiny(source, seq_len=8), out, progress=False, log=lambda m: None, meter_kwargs=meter())
    with pytest.raises(ValueError, match="metered with"):
        run_race(tiny(source), out, progress=False, log=lambda m: None, meter_kwargs=meter(cpu_watts=10.0))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="budget_joules"):
        quick_settings(budget_joules=float("nan"))
    with pytest.raises(ValueError, match="slices"):
        quick_settings(slices=0)


def test_cli_quick_race(tmp_path, source, capsys):
    out = tmp_path / "cli"
    code = cli.main(["lm", "race", "--quick", "--budget-joules", "0.5", "--slices", "1", "--source", source,
                     "--out", str(out), "--no-progress", "--threads", "1", "--family", "mamba2",
                     "--seq-len", "16", "--batch-size", "2", "--state-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "val bpb" in printed and "mamba2" in printed and "race.json" in printed
    saved = json.loads((out / "race.json").read_text())
    assert saved["models"]["ssm"]["family"] == "mamba2"
    assert saved["settings"]["seq_len"] == 16 and saved["settings"]["batch_size"] == 2
    assert saved["models"]["ssm"]["config"]["state_size"] == 4


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["lm", "race", "--budget-joules", "-1"])
    assert "positive" in capsys.readouterr().err
    missing = tmp_path / "absent"
    code = cli.main(["lm", "race", "--quick", "--source", str(missing), "--out", str(tmp_path / "o"),
                     "--no-progress"])
    assert code == 1
    assert "train.txt" in capsys.readouterr().err
