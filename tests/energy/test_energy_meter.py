"""Meter: the estimate's arithmetic, env overrides, CO2e, laps, measure(), peak memory, CLI helpers."""

import argparse
import os
import subprocess
import sys
import threading

import pytest

from leanseq.energy import (
    DEFAULT_CPU_WATTS_PER_CORE,
    DEFAULT_GRID_INTENSITY,
    Meter,
    add_cli_arguments,
    grams_co2e,
    meter_kwargs_from_args,
)
from leanseq.energy import meter as meter_mod


def test_estimate_is_cpu_seconds_times_watts(clocks):
    wall, cpu = clocks
    with Meter("estimate", cpu_watts=10, clock=wall, cpu_clock=cpu) as m:
        wall.advance(1.5)
        cpu.advance(2.1)
    r = m.result
    assert r.energy_j == pytest.approx(21.0)
    assert (r.wall_s, r.cpu_s) == pytest.approx((1.5, 2.1))
    assert r.method == "estimated: 2.1 CPU-s x 10 W/core, cpu_watts= watts"
    assert not r.measured and r.backend == "estimate"
    assert str(r).startswith("21 J (estimated: 2.1 CPU-s x 10 W/core")


def test_default_watts_and_env_override(clocks, monkeypatch):
    wall, cpu = clocks
    m = Meter("estimate", clock=wall, cpu_clock=cpu).start()
    cpu.advance(2.0)
    r = m.stop()
    assert r.energy_j == pytest.approx(2.0 * DEFAULT_CPU_WATTS_PER_CORE)
    assert "default watts" in r.method

    monkeypatch.setenv("LEANSEQ_CPU_WATTS", "5")
    m = Meter("estimate", clock=wall, cpu_clock=cpu).start()
    cpu.advance(2.0)
    r = m.stop()
    assert r.energy_j == pytest.approx(10.0) and "LEANSEQ_CPU_WATTS" in r.method

    m = Meter("estimate", cpu_watts=3, clock=wall, cpu_clock=cpu).start()  # the argument beats the env var
    cpu.advance(2.0)
    assert m.stop().energy_j == pytest.approx(6.0)


def test_env_backend_selects_estimate(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANSEQ_ENERGY_BACKEND", "estimate")
    assert Meter().backend_name == "estimate"
    assert Meter().backend_reason == "requested"


@pytest.mark.parametrize(
    "env, value, match",
    [
        ("LEANSEQ_CPU_WATTS", "abc", "LEANSEQ_CPU_WATTS"),
        ("LEANSEQ_CPU_WATTS", "-3", "LEANSEQ_CPU_WATTS"),
        ("LEANSEQ_CPU_WATTS", "nan", "LEANSEQ_CPU_WATTS"),
        ("LEANSEQ_GRID_INTENSITY", "-1", "LEANSEQ_GRID_INTENSITY"),
        ("LEANSEQ_ENERGY_BACKEND", "joulemeter", "LEANSEQ_ENERGY_BACKEND"),
    ],
)
def test_bad_env_values_are_named(monkeypatch, env, value, match):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        Meter("estimate") if env != "LEANSEQ_ENERGY_BACKEND" else Meter()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="cpu_watts"):
        Meter("estimate", cpu_watts=0)
    with pytest.raises(ValueError, match="backend='gpu'"):
        Meter("gpu")
    with pytest.raises(ValueError, match="index"):
        Meter("estimate", device="cuda:x")
    with pytest.raises(TypeError, match="device"):
        Meter("estimate", device=3)


def test_co2_conversion(clocks, monkeypatch):
    assert grams_co2e(3.6e6, 436.0) == pytest.approx(436.0)  # 1 kWh
    wall, cpu = clocks
    with Meter("estimate", cpu_watts=10, grid_intensity=100, clock=wall, cpu_clock=cpu) as m:
        cpu.advance(3.6)  # 36 J = 1e-5 kWh
    assert m.result.co2e_g == pytest.approx(1e-3)
    assert "0.001 gCO2e at 100 g/kWh" in str(m.result)

    monkeypatch.setenv("LEANSEQ_GRID_INTENSITY", "50")
    with Meter("estimate", cpu_watts=10, clock=wall, cpu_clock=cpu) as m:
        cpu.advance(3.6)
    assert (m.result.grid_gco2e_per_kwh, m.result.co2e_g) == pytest.approx((50.0, 5e-4))

    monkeypatch.delenv("LEANSEQ_GRID_INTENSITY")
    with Meter("estimate", clock=wall, cpu_clock=cpu) as m:
        cpu.advance(1.0)
    assert m.result.grid_gco2e_per_kwh == DEFAULT_GRID_INTENSITY
    assert Meter("estimate", grid_intensity=0).grid_intensity == 0.0  # a zero-carbon grid is allowed


def test_laps_and_total(clocks):
    wall, cpu = clocks
    m = Meter("estimate", cpu_watts=2, clock=wall, cpu_clock=cpu).start()
    cpu.advance(1.0)
    wall.advance(1.0)
    a = m.lap("prefill")
    cpu.advance(3.0)
    wall.advance(4.0)
    b = m.lap("decode")
    cpu.advance(0.5)
    total = m.stop()
    assert (a.energy_j, b.energy_j, total.energy_j) == pytest.approx((2.0, 6.0, 9.0))
    assert (a.wall_s, b.wall_s, total.wall_s) == pytest.approx((1.0, 4.0, 5.0))
    assert str(a).startswith("prefill: 2 J (estimated:")
    assert m.measurements == [a, b] and m.result is total


def test_measure_windows_in_a_loop(clocks):
    wall, cpu = clocks
    meter = Meter("estimate", cpu_watts=1, clock=wall, cpu_clock=cpu)
    results = []
    for n in (1, 2, 3):
        with meter.measure(label=n) as w:
            assert w.result is None
            cpu.advance(n)
        results.append(w.result)
    assert [r.energy_j for r in results] == pytest.approx([1.0, 2.0, 3.0])
    assert [r.label for r in results] == ["1", "2", "3"]
    assert meter.measurements == results
    d = results[0].to_dict()
    assert d["method"].startswith("estimated:") and d["energy_j"] == pytest.approx(1.0)


def test_measure_error_propagates_and_leaves_no_window_open():
    meter = Meter("estimate")
    with pytest.raises(KeyError), meter.measure("boom") as w:
        raise KeyError("x")
    assert w.result is None and meter.measurements == []
    assert meter_mod._ACTIVE == []


def test_misuse_is_a_clear_error():
    m = Meter("estimate")
    with pytest.raises(RuntimeError, match="not running"):
        m.stop()
    with pytest.raises(RuntimeError, match="not running"):
        m.lap()
    m.start()
    with pytest.raises(RuntimeError, match="already running"):
        m.start()
    m.stop()
    assert meter_mod._ACTIVE == []


def test_no_threads_started():
    before = threading.active_count()
    with Meter("estimate") as m:
        assert threading.active_count() == before
    assert m.result.wall_s >= 0


def _can_reset_rss_peak() -> bool:
    return os.path.exists("/proc/self/status") and meter_mod._reset_rss_peak()


@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_is_per_window_and_nested_windows_keep_theirs():
    block = 48 << 20
    meter = Meter("estimate")
    with meter.measure("outer") as outer:
        with meter.measure("big") as big:
            data = b"\x01" * block  # touched pages, so they count in RSS
            del data
        with meter.measure("small") as small:  # resets the high-water mark; outer must still see "big"
            pass
    assert big.result.peak_rss_scope == "window"
    assert big.result.peak_rss_bytes >= big.result.rss_start_bytes + block * 0.9
    assert small.result.peak_rss_bytes < big.result.peak_rss_bytes - block * 0.5
    assert outer.result.peak_rss_bytes >= big.result.peak_rss_bytes
    assert "peak RSS" in str(big.result) and "process lifetime" not in str(big.result)


def test_peak_rss_lifetime_when_not_reset():
    with Meter("estimate", reset_peak_rss=False) as m:
        pass
    r = m.result
    assert r.peak_rss_scope == "process lifetime"
    if r.peak_rss_bytes is not None:
        assert "(process lifetime)" in str(r)
    assert r.cuda_peak_allocated_bytes is None and r.device == "cpu"


def test_no_memory_reading_when_rss_not_tracked(clocks, monkeypatch):
    """A server meters every round: track_rss=False must not touch /proc, and still measure time and energy."""
    def no_proc():
        raise AssertionError("read /proc although track_rss=False")

    monkeypatch.setattr(meter_mod, "_rss_now_and_peak", no_proc)
    wall, cpu = clocks
    meter = Meter("estimate", cpu_watts=10, track_rss=False, clock=wall, cpu_clock=cpu)
    with meter.measure() as window:
        cpu.advance(0.5)
    r = window.result
    assert r.energy_j == pytest.approx(5.0)
    assert (r.peak_rss_bytes, r.rss_start_bytes, r.peak_rss_scope) == (None, None, "not tracked")
    assert "peak RSS" not in str(r)


def test_cli_helpers(clocks):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--cpu-watts", "12", "--energy-backend", "estimate", "--grid-intensity", "300"])
    wall, cpu = clocks
    m = Meter(**meter_kwargs_from_args(args), clock=wall, cpu_clock=cpu).start()
    cpu.advance(1.0)
    r = m.stop()
    assert (r.energy_j, r.grid_gco2e_per_kwh) == pytest.approx((12.0, 300.0))
    assert "cpu_watts=" in r.method
    assert meter_kwargs_from_args(parser.parse_args([])) == {
        "backend": None, "cpu_watts": None, "grid_intensity": None,
    }
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpu-watts", "-1"])


def test_import_probes_nothing():
    code = (
        "import sys, leanseq.energy; "
        "print('pynvml' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_module_entry_point_reports_method_and_reason(capsys, tmp_path, monkeypatch):
    from leanseq.energy import backends
    from leanseq.energy.__main__ import main

    monkeypatch.setattr(backends, "DEFAULT_POWERCAP_ROOT", str(tmp_path / "absent"))

    assert main(["--cpu-watts", "9", "--grid-intensity", "20"]) == 0
    out = capsys.readouterr().out
    assert "backend: estimate" in out and "9 W/core (cpu_watts= watts)" in out and "20 gCO2e/kWh" in out
    assert main(["--energy-backend", "rapl"]) == 1
    assert "no powercap tree" in capsys.readouterr().err
