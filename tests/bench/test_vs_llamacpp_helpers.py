"""benchmarks/vs_llamacpp.py's pure helpers: llama-bench JSON, the contention filter, medians. No build, no run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_llamacpp.py"
_spec = importlib.util.spec_from_file_location("vs_llamacpp", _PATH)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)


def _entry(n_prompt, n_gen, n_depth=0, samples=(10.0,), **kw):
    e = {"build_commit": "abc1234", "model_type": "mamba ?B F32", "model_size": 1234, "n_threads": 2,
         "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth, "avg_ts": sum(samples) / len(samples),
         "samples_ts": list(samples)}
    e.update(kw)
    return e


def test_parse_llama_bench_json_names_tests_and_keeps_samples():
    text = json.dumps([_entry(512, 0, samples=(400.5,)), _entry(0, 128, samples=(60.0, 62.0)),
                       _entry(0, 128, n_depth=4096), _entry(512, 128)])
    rows = vs.parse_llama_bench_json(text)
    assert [r["test"] for r in rows] == ["pp512", "tg128", "tg128@d4096", "pp512+tg128"]
    assert rows[0]["tokens_per_s"] == [400.5]
    assert rows[1]["tokens_per_s"] == [60.0, 62.0]
    assert rows[0]["model_size"] == 1234 and rows[0]["n_threads"] == 2 and rows[0]["build_commit"] == "abc1234"


def test_parse_llama_bench_json_without_samples_or_depth_uses_average():
    entry = _entry(0, 128)
    del entry["samples_ts"], entry["n_depth"]
    (row,) = vs.parse_llama_bench_json(json.dumps([entry]))
    assert row["test"] == "tg128" and row["tokens_per_s"] == [10.0]


def test_other_cpu_fraction_subtracts_own_time_and_slack():
    # 2 s of wall time; all CPUs busy 4.5 s of which we used 4.0 s -> others 0.5 s = 0.25 cores
    assert vs.other_cpu_fraction(4.5, 4.0, 2.0) == pytest.approx(0.25)
    assert vs.other_cpu_fraction(4.5, 4.0, 2.0, slack_s=0.1) == pytest.approx(0.2)
    assert vs.other_cpu_fraction(3.9, 4.0, 2.0) == 0.0  # clock granularity never makes it negative
    with pytest.raises(ValueError):
        vs.other_cpu_fraction(1.0, 1.0, 0.0)


def test_keep_sample_threshold_is_inclusive():
    assert vs.keep_sample(0.10, 0.10)
    assert vs.keep_sample(0.0, 0.10)
    assert not vs.keep_sample(0.11, 0.10)


def test_summarize_median_and_spread():
    s = vs.summarize([3.0, 1.0, 2.0, 10.0])
    assert s == {"n": 4, "median": 2.5, "min": 1.0, "max": 10.0}
    assert vs.summarize([]) == {"n": 0, "median": None, "min": None, "max": None}
    assert vs.fmt_stat(vs.summarize([]))  # says no sample was kept instead of failing
    assert vs.fmt_stat(s) == "2.5 [1.0–10.0]"


def test_kv_cache_bytes():
    # SmolLM-135M: 30 layers, 3 kv heads of 64, 4096 positions, f16 -> 2 * 30 * 3 * 64 * 4096 * 2 bytes
    assert vs.kv_cache_bytes(30, 3, 64, 4096, 2) == 94_371_840


def test_decode_bytes_per_token_adds_kv_cache_at_depth_only():
    meta = {"leanseq_weights_bytes": {"leanseq": 1000, "leanseq int8": 400}, "llamacpp_model_size": {"q8_0": 300},
            "config": {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 3,
                       "num_key_value_heads": 1}}
    assert vs.decode_bytes_per_token("leanseq", "tg128", meta, "llama") == 1000
    assert vs.decode_bytes_per_token("leanseq", "tg128@d10", meta, "llama") == 1000 + 2 * 3 * 1 * 4 * 10 * 4
    assert vs.decode_bytes_per_token("leanseq int8", "tg128", meta, "llama") == 400
    assert vs.decode_bytes_per_token("llama.cpp q8_0", "tg128@d10", meta, "llama") == 300 + 2 * 3 * 1 * 4 * 10 * 2
    assert vs.decode_bytes_per_token("llama.cpp f16", "tg128", meta, "llama") is None


def test_int8_is_compared_with_q8_0_and_float32_with_the_rest():
    ours = ["leanseq", "leanseq int8"]
    assert vs.ours_for("llama.cpp q8_0", ours) == "leanseq int8"
    assert vs.ours_for("llama.cpp f16", ours) == "leanseq"
    assert vs.ours_for("llama.cpp q8_0", ["leanseq"]) == "leanseq"
