"""`leanseq repro` and `leanseq demo`: tiny end-to-end runs, the tables, and the shipped checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from leanseq.bench import demo, repro
from leanseq.cli import main
from leanseq.tasks import InductionHeadsConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_repro_induction_quick_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "ind"
    assert main(["repro", "induction", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    table = (out / "repro_induction.md").read_text()
    assert (out / "repro_induction.png").read_bytes().startswith(PNG_MAGIC)
    results = json.loads((out / "repro_induction.json").read_text())
    assert set(results["models"]) == {"mamba", "mha-abs", "mha-rope"}
    for info in results["models"].values():
        assert info["training"]["steps"] == 3
        assert set(info["accuracy"]) == {"16", "32", "64", "128"}
    # the absolute-position table of the quick run ends at 64, so 128 is skipped and says why
    assert results["models"]["mha-abs"]["accuracy"]["128"]["status"] == "skipped"
    assert "no position embedding past 64" in table
    assert results["models"]["mamba"]["accuracy"]["128"]["status"] == "ok"
    assert "Produced by `leanseq repro induction" in table
    assert "Table 11" in table and "wrote" in capsys.readouterr().out
    # the trained models were saved and a rerun resumes instead of training again
    assert (out / "train" / "mamba" / "model" / "config.json").is_file()
    assert main(["repro", "induction", "--quick", "--out", str(out), "--no-progress", "--models", "mamba"]) == 0
    again = json.loads((out / "repro_induction.json").read_text())
    assert again["models"]["mamba"]["training"]["resumed_from"] == 3


def test_repro_selective_copy_quick(tmp_path):
    out = tmp_path / "sc"
    assert main(["repro", "selective-copy", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    table = (out / "repro_selective_copy.md").read_text()
    assert (out / "repro_selective_copy.png").read_bytes().startswith(PNG_MAGIC)
    results = json.loads((out / "repro_selective_copy.json").read_text())
    assert results["models"]["lti"]["config"]["model_type"] == "leanseq_mamba_lti"
    assert "model_type" not in results["models"]["selective"]["config"] or \
        results["models"]["selective"]["config"]["model_type"] == "mamba"
    assert "| Mamba / S4 (LTI, S4-like) | 56.4 |" in table
    assert "| Mamba / S6 (selective) | 99.8 |" in table
    assert "Table 1" in table


def test_repro_rejects_unknown_model(tmp_path, capsys):
    assert main(["repro", "induction", "--quick", "--out", str(tmp_path), "--models", "mamba,gpt"]) == 1
    assert "unknown model" in capsys.readouterr().err


def _fake_induction_results() -> dict:
    settings = repro.quick_induction_settings()
    settings.test_lengths = (2**9, 2**10, 2**15)

    def entries(ok_lengths, skip_reason=None):
        out = {}
        for n in settings.test_lengths:
            if n in ok_lengths:
                out[str(n)] = {"length": n, "samples": 4, "status": "ok", "correct": 4, "accuracy": ok_lengths[n]}
            else:
                out[str(n)] = {"length": n, "samples": 4, "status": "skipped", "reason": skip_reason}
        return out

    training = {"steps": 10, "final_loss": 0.01}
    return {
        "settings": dataclasses.asdict(settings),
        "models": {
            "mamba": {"class": "MambaLM", "paper_row": "Mamba", "num_parameters": 66496, "trained_parameters": 66496,
                      "training": training, "accuracy": entries({2**9: 1.0, 2**10: 0.995, 2**15: 1.0})},
            "mha-abs": {"class": "TransformerLM", "paper_row": "MHA-Abs", "num_parameters": 100000,
                        "trained_parameters": 70000, "training": training,
                        "accuracy": entries({2**9: 0.5, 2**10: 0.25}, "no position embedding past 16384")},
        },
    }


def test_induction_table_puts_paper_numbers_beside_ours():
    table = repro.format_induction_table(_fake_induction_results())
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert header.split("|")[4:7] == [" 2^9 ", " 2^10 ", " 2^15 "]
    rows = [line for line in lines if line.startswith(("| Mamba |", "| MHA-Abs |"))]
    # each model: the paper's row, then ours directly below it
    assert [r.split("|")[2].strip() for r in rows] == ["paper", "**leanseq**", "paper", "**leanseq**"]
    assert rows[0].split("|")[4:7] == [" 100 ", " 100 ", " 100 "]  # Mamba: 100 up to 2^20
    assert rows[1].split("|")[4:7] == [" 100.0 ", " 99.5 ", " 100.0 "]
    assert rows[2].split("|")[4:7] == [" 58.6 ", " 26.6 ", " - "]  # MHA-Abs: not reported past 2^14
    assert rows[3].split("|")[4:7] == [" 50.0 ", " 25.0 ", " skip[1] "]
    assert "skip[1] (no position embedding past 16384)" in table
    assert "70,000 can train" in table


def test_transformer_skip_reasons():
    settings = repro.quick_induction_settings()
    abs_model = repro.induction_model("mha-abs", settings)
    rope_model = repro.induction_model("mha-rope", settings)
    assert "no position embedding past 64" in repro.transformer_skip_reason(abs_model, 128, 1, settings, [])
    assert repro.transformer_skip_reason(rope_model, 128, 1, settings, []) is None
    # 1 s per sequence at 64 predicts 4 s per sequence at 128 (quadratic), x 2 sequences: over a 7 s budget
    settings.time_budget = 7.0
    assert settings.samples_at(128) == 2
    reason = repro.transformer_skip_reason(rope_model, 128, 1, settings, [(64, 1.0)])
    assert "time: predicted 8 s for 2 sequences" in reason
    settings.time_budget = 9.0
    assert repro.transformer_skip_reason(rope_model, 128, 1, settings, [(64, 1.0)]) is None
    settings.memory_budget = 1e3
    assert "memory" in repro.transformer_skip_reason(rope_model, 64, 1, settings, [])


def test_trained_parameters_leave_out_untrained_position_rows():
    settings = repro.quick_induction_settings()  # table of 64 rows, trained at 32
    model = repro.induction_model("mha-abs", settings)
    assert repro.trained_parameters(model, 32) == model.num_parameters() - 32 * settings.d_model
    mamba = repro.induction_model("mamba", settings)
    assert repro.trained_parameters(mamba, 32) == mamba.num_parameters()


def test_chunked_last_logits_equal_the_full_forward():
    torch.manual_seed(0)
    model = repro.induction_model("mamba", repro.quick_induction_settings()).eval()
    inputs, _, _ = InductionHeadsConfig(seq_len=100).generate(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(inputs)[:, -1]
    chunked = repro.last_logits(model, inputs, prefill_chunk=16)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)


def test_demo_quick_on_bundled_checkpoints(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1",
                 "--energy-backend", "estimate"]) == 0
    report = (out / "report.md").read_text()
    assert (out / "plot.png").read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "longest context both models completed" in printed
    results = json.loads((out / "demo.json").read_text())
    rows = {(r["model"], r["length"]): r for r in results["rows"]}
    assert set(rows) == {(m, n) for m in ("mamba", "transformer") for n in (16, 64, 256)}
    for r in rows.values():
        assert r["status"] == "ok" and r["method"].startswith("estimated")
    # the recurrent state is the same size at every length; the KV cache grows with the context
    assert rows["mamba", 16]["state_bytes"] == rows["mamba", 256]["state_bytes"]
    kv_16, kv_256 = rows["transformer", 16]["state_bytes"], rows["transformer", 256]["state_bytes"]
    assert 15.9 < kv_256 / kv_16 <= 16  # the KV cache is linear in the context (plus a position counter)
    assert results["headline"]["length"] == 256
    assert "| 2^8 (256) | mamba |" in report and "estimated" in report
    # the headline states the measurement and how the joules were obtained, not an internal target
    head = results["headline"]
    assert "target" not in printed.lower() and "target" not in report.lower() and "target_met" not in head
    assert f"transformer / Mamba = {head['energy_ratio']:.3g}x" in printed
    assert "estimated: process CPU-s x" in head["text"] and head["energy_method"] in head["title"]


def test_demo_plot_title_is_short_enough_to_show_the_whole_headline():
    row = {"status": "ok", "samples": 2, "state_bytes": 19_500, "method": "estimated: 1 CPU-s x 6.75 W/core"}
    rows = [{**row, "model": "mamba", "length": 2**16, "correct": 2, "accuracy": 1.0, "joules_per_token": 1.54e-4},
            {**row, "model": "transformer", "length": 2**16, "correct": 0, "accuracy": 0.0,
             "joules_per_token": 1.08e-2},
            {**row, "model": "mamba", "length": 2**20, "correct": 1, "accuracy": 1.0, "joules_per_token": 1.54e-4}]
    results = {"rows": rows, "energy": {"method": "estimated: process CPU-s x 6.75 W/core (default watts)"}}
    head = demo.headline(results)
    assert head["title"].startswith("Induction heads at 2^16 tokens: Mamba 100% vs transformer 0% accurate")
    assert "transformer / Mamba = 70.1x (estimated: process CPU-s x 6.75 W/core (default watts))" in head["title"]
    assert len(head["title"]) <= 2 * 120  # the plot wraps it at 120 characters: two lines at most
    assert "Mamba went on to 2^20" in head["text"] and "target" not in head["text"].lower()


def test_bundled_checkpoints_load_and_solve_induction_heads_at_256():
    task = InductionHeadsConfig(seq_len=256)
    for which, floor in (("mamba", 0.99), ("transformer", 0.95)):
        model = demo.load_bundled(which)
        assert model.num_parameters() < 100_000
        assert sum(f.stat().st_size for f in demo.bundled_path(which).iterdir()) < 1_000_000
        correct, n = repro.induction_accuracy(model, task, samples=128, batch_rows=64, seed=1234)
        assert correct / n >= floor, f"bundled {which}: {correct}/{n} at length 256"


def test_bundled_path_rejects_unknown_model():
    with pytest.raises(ValueError, match="no bundled demo model"):
        demo.bundled_path("rwkv")


def test_curriculum_trains_short_stages_first_and_resumes(tmp_path):
    settings = repro.quick_induction_settings()
    training = dataclasses.replace(settings.mamba, curriculum=((16, 4, 2),))
    model = repro.induction_model("mamba", settings)
    task = InductionHeadsConfig(seq_len=32)
    info = repro.train(model, task, training, tmp_path / "run", progress=False)
    assert [(c["seq_len"], c["batch_size"], c["steps"]) for c in info["curriculum"]] == [(16, 4, 2)]
    assert info["steps"] == 3
    assert (tmp_path / "run" / "stage0-len16" / "model" / "config.json").is_file()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    # a second call resumes both stages from their checkpoints and trains nothing more
    again = repro.induction_model("mamba", settings)
    info = repro.train(again, task, training, tmp_path / "run", progress=False)
    assert info["resumed_from"] == 3 and info["curriculum"][0]["resumed_from"] == 2
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_parse_curriculum():
    from leanseq.bench.repro_commands import parse_curriculum

    assert parse_curriculum("64x32:500, 128x16:200") == ((64, 32, 500), (128, 16, 200))
    for bad in ("64:500", "64x32", "0x32:5", ""):
        with pytest.raises(Exception, match="curriculum"):
            parse_curriculum(bad)
