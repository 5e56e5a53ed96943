"""`leanseq bench context`: outputs, skip logic, estimates and spec errors, on tiny models and lengths."""

from __future__ import annotations

import json

import pytest
import torch

from leanseq import cli
from leanseq.bench import context as race
from leanseq.bench.spec import ModelSpecError, build_from_spec, parse_model_spec, resolve_model
from leanseq.energy import Meter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _energy_figures(node, path="$"):
    """Every dict in the JSON that carries joules, with where it sits."""
    if isinstance(node, dict):
        if "joules" in node:
            yield path, node
        for key, value in node.items():
            yield from _energy_figures(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _energy_figures(value, f"{path}[{i}]")


def test_quick_run_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "race"
    rc = cli.main(["bench", "context", "--quick", "--decode-steps", "4", "--no-progress", "--energy-backend",
                   "estimate", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "66,496 parameters" in stdout and "70,976 parameters" in stdout  # both counts printed
    assert "decode med" in stdout and "transformer / mamba" in stdout
    assert "per-token decode latency at 256 vs at 64" in stdout

    results = json.loads((out / "context_race.json").read_text())
    for key in ("models", "lengths", "rows", "energy", "metadata", "settings", "summary"):
        assert key in results
    assert results["lengths"] == [64, 128, 256]
    assert set(results["models"]) == {"mamba", "transformer"}
    meta = results["metadata"]
    assert meta["torch_threads"] >= 1 and meta["versions"]["torch"] == torch.__version__
    assert "cpu" in meta["machine"] and meta["command_line"]
    assert results["energy"]["method"].startswith("estimated")

    rows = results["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    # the two models alternate who goes first at each length
    assert [r["model"] for r in rows] == ["mamba", "transformer", "transformer", "mamba", "mamba", "transformer"]
    for r in rows:
        d = r["decode"]
        assert d["steps"] == 4 and 0 < d["median_s"] <= d["p99_s"]
        assert r["whole_stream"]["tokens"] == r["context"] and r["whole_stream"]["wall_s"] > 0
    by = {(r["model"], r["context"]): r for r in rows}
    # Mamba's state does not grow; the transformer's KV cache does
    assert by["mamba", 64]["state_bytes"] == by["mamba", 256]["state_bytes"]
    assert by["transformer", 256]["state_bytes"] == 4 * by["transformer", 64]["state_bytes"] - 3 * 8
    assert "kv_cache_fill" in by["transformer", 128] and "kv_cache_fill" not in by["mamba", 128]
    figures = list(_energy_figures(results))
    assert len(figures) >= 12
    for where, fig in figures:
        assert isinstance(fig["method"], str) and fig["method"].startswith(("estimated", "measured")), where

    table = (out / "context_race.txt").read_text()
    assert table.splitlines()[0].split()[:2] == ["context", "model"]
    png = (out / "context_race.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _tiny_race(model_a, model_b, lengths, **kwargs):
    kwargs.setdefault("meter", Meter("estimate"))
    return race.run_context_race(model_a, model_b, lengths, decode_steps=2, warmup_steps=0, progress=False, **kwargs)


def test_tiny_memory_budget_skips_the_transformer_with_its_reason():
    mamba, transformer = build_from_spec("mamba"), build_from_spec("transformer")
    lengths, chunk, budget = [64, 512], 64, 1e6
    assert race.estimate_memory(mamba, 512, 2, chunk)["total"] < budget  # Mamba fits at every length
    results = _tiny_race(mamba, transformer, lengths, memory_budget=budget, prefill_chunk=chunk)
    status = {(r["model"], r["context"]): r for r in results["rows"]}
    assert status["mamba", 512]["status"] == "ok" and status["transformer", 64]["status"] == "ok"
    skipped = status["transformer", 512]
    assert skipped["status"] == "skipped" and "decode" not in skipped
    assert skipped["reason"].startswith("skipped: KV cache") and "> 1 MB memory budget" in skipped["reason"]
    assert skipped["reason"] in race.format_table(results)
    # ratios use the longest context both completed, and say so
    assert any("read 64 tokens (longest context both completed)" in line for line in results["summary"])


def test_time_budget_and_absolute_positions_skip_with_reasons():
    mamba = build_from_spec("mamba")
    absolute = build_from_spec("transformer:position_embedding=absolute,max_position_embeddings=100")
    results = _tiny_race(mamba, absolute, [32, 64, 128], time_budget=1e-9)
    status = {(r["model"], r["context"]): r for r in results["rows"]}
    # the first length has nothing to extrapolate from; later ones are predicted from it and exceed 1 ns
    assert status["mamba", 32]["status"] == "ok"
    assert status["mamba", 64]["reason"].startswith("skipped: predicted") and "time budget" in status["mamba", 64]["reason"]
    assert status["transformer", 128]["reason"] == (
        "skipped: context 128 + 2 decode steps > max_position_embeddings 100 (absolute positions)")


def test_predict_seconds_scales_by_the_context_ratio():
    assert race.predict_seconds(1024, 2.0, 4096, 2.0)[0] == pytest.approx(32.0)
    assert race.predict_seconds(1024, 2.0, 4096, 1.0)[0] == pytest.approx(8.0)
    assert race.predict_seconds(1024, 2.0, 4096, 1.0)[1] == "2 s at 1024 x (4096/1024)^1"
    with pytest.raises(ValueError, match="positive contexts"):
        race.predict_seconds(0, 1.0, 1024, 1.0)


def test_total_budget_skips_what_would_end_past_it():
    results = _tiny_race(build_from_spec("mamba"), build_from_spec("transformer"), [32, 64], total_budget=1e-6)
    later = [r for r in results["rows"] if r["context"] == 64]
    assert all(r["status"] == "skipped" and "left of the total budget" in r["reason"] for r in later)


def test_memory_estimate_matches_the_real_kv_cache_and_constant_recurrent_state():
    transformer = build_from_spec("transformer:num_key_value_heads=2")
    with torch.inference_mode():
        _, state = transformer(torch.zeros(1, 256, dtype=torch.long), transformer.init_state(1), return_state=True)
    est = race.estimate_memory(transformer, 256, decode_steps=0)
    assert est["kv_cache"] == state.nbytes() - state.position.nbytes
    cfg = transformer.config
    assert est["kv_cache"] == 2 * cfg.num_hidden_layers * 2 * cfg.head_dim * 256 * 4
    assert race.estimate_memory(transformer, 4096, 0)["kv_cache"] == 16 * est["kv_cache"]
    # decode steps past a power of two need the doubled cache
    assert race.estimate_memory(transformer, 256, 1)["kv_cache"] == 2 * est["kv_cache"]
    assert est["total"] == sum(v for k, v in est.items() if k != "total")

    mamba = build_from_spec("mamba")
    small, big = race.estimate_memory(mamba, 2**10, 64, 512), race.estimate_memory(mamba, 2**20, 64, 512)
    assert small == big and small["state"] == mamba.init_state(1).nbytes()
    with pytest.raises(ValueError, match="context"):
        race.estimate_memory(mamba, 0)


def test_spec_parsing_and_clear_errors(tmp_path):
    assert parse_model_spec("mamba:hidden_size=32, num_hidden_layers=1,residual_in_fp32=false") == (
        "mamba", {"hidden_size": 32, "num_hidden_layers": 1, "residual_in_fp32": False})
    assert parse_model_spec("llama") == ("transformer", {})
    model = build_from_spec("transformer:hidden_size=32,num_attention_heads=2,rms_norm_eps=1e-5")
    assert model.config.hidden_size == 32 and model.config.vocab_size == 16 and model.config.rms_norm_eps == 1e-5

    with pytest.raises(ModelSpecError, match="unknown model family 'gpt'"):
        parse_model_spec("gpt:hidden_size=64")
    with pytest.raises(ModelSpecError, match="'hidden_size' in .* is not key=value"):
        parse_model_spec("mamba:hidden_size")
    with pytest.raises(ModelSpecError, match="sets 'hidden_size' twice"):
        parse_model_spec("mamba:hidden_size=1,hidden_size=2")
    with pytest.raises(ModelSpecError, match="unknown config key 'hiden_size'"):
        build_from_spec("mamba:hiden_size=64")
    with pytest.raises(ModelSpecError, match="empty model spec"):
        parse_model_spec("  ")
    with pytest.raises(ModelSpecError, match="neither a checkpoint folder"):
        resolve_model(str(tmp_path / "missing"), what="--model-a")

    saved = build_from_spec("mamba:hidden_size=16")
    saved.save_pretrained(tmp_path / "ckpt")
    loaded, source = resolve_model(str(tmp_path / "ckpt"))
    assert type(loaded).__name__ == "MambaLM" and loaded.config.hidden_size == 16 and "ckpt" in source


def test_cli_reports_bad_input_clearly(capsys, tmp_path):
    assert cli.main(["bench", "context", "--quick", "--model-b", "transformer:hidden=64", "--out", str(tmp_path)]) == 1
    assert "--model-b: spec 'transformer:hidden=64': unknown config key 'hidden'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "context", "--memory-budget", "lots"])
    assert "--memory-budget: memory size 'lots'" in capsys.readouterr().err
    assert cli.main(["bench", "context", "--min-len", "2^12", "--max-len", "2^10", "--out", str(tmp_path)]) == 1
    assert "--max-len 1024 is shorter than --min-len 4096" in capsys.readouterr().err


def test_size_and_length_parsers():
    assert race.parse_bytes("8GB") == 8e9 and race.parse_bytes("2 GiB") == 2 * 2**30
    assert race.parse_bytes("512mb") == 512e6 and race.parse_bytes("3") == 3e9
    assert race.parse_length("2^20") == 2**20 == race.parse_length("1M") and race.parse_length("64k") == 65536
    assert race.context_lengths(2**10, 2**20) == [2**10, 2**12, 2**14, 2**16, 2**18, 2**20]
    for bad in ("-1GB", "0", "inf"):
        with pytest.raises(ValueError):
            race.parse_bytes(bad)
    with pytest.raises(ValueError, match="not an integer"):
        race.parse_length("big")
