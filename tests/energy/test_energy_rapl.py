"""RAPL backend against a fake powercap tree: sums, subzones, wrap-around, unreadable counters."""

import os

import pytest

from leanseq.energy import EnergyBackendError, Meter, backends, default_backend_name

BIG = 262_143_328_850  # a real max_energy_range_uj


def make_zone(root, dirname, name, energy_uj, max_range=BIG):
    zone = root / dirname
    zone.mkdir()
    (zone / "name").write_text(f"{name}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def set_uj(zone, value):
    (zone / "energy_uj").write_text(f"{value}\n")


def bump_uj(zone, delta):
    set_uj(zone, int((zone / "energy_uj").read_text()) + delta)


@pytest.fixture
def powercap(tmp_path):
    """Two packages, a core subzone of package 0, and two zones that overlap the packages (mmio, psys)."""
    root = tmp_path / "powercap"
    root.mkdir()
    zones = {
        "pkg0": make_zone(root, "intel-rapl:0", "package-0", 1_000_000),
        "core0": make_zone(root, "intel-rapl:0:0", "core", 400_000),
        "pkg1": make_zone(root, "intel-rapl:1", "package-1", 7_000_000),
        "mmio": make_zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000),
        "psys": make_zone(root, "intel-rapl:2", "psys", 9_000_000),
    }
    return root, zones


def test_sums_packages_only(powercap, clocks):
    root, z = powercap
    wall, cpu = clocks
    with Meter("rapl", rapl_root=root, clock=wall, cpu_clock=cpu) as m:
        bump_uj(z["pkg0"], 2_000_000)
        bump_uj(z["pkg1"], 3_500_000)
        bump_uj(z["core0"], 1_500_000)  # inside package 0 already
        bump_uj(z["mmio"], 2_000_000)  # a second view of package 0
        bump_uj(z["psys"], 50_000_000)  # platform total, overlaps the packages
        wall.advance(2.0)
    r = m.result
    assert r.energy_j == pytest.approx(5.5)
    assert r.backend == "rapl" and r.measured
    assert r.method == "measured: RAPL package counters, 2 packages, whole socket"
    assert "5.5 J (measured: RAPL package counters" in str(r)
    assert r.avg_watts == pytest.approx(2.75)
    assert m.backend_reason == "requested"


def test_wraparound_uses_max_energy_range(tmp_path, clocks):
    root = tmp_path / "pc"
    root.mkdir()
    pkg = make_zone(root, "intel-rapl:0", "package-0", 990_000, max_range=1_000_000)
    wall, cpu = clocks
    m = Meter("rapl", rapl_root=root, clock=wall, cpu_clock=cpu).start()
    set_uj(pkg, 40_000)  # passed max_energy_range_uj and wrapped: 10_000 + 40_000 uJ
    r = m.stop()
    assert r.energy_j == pytest.approx(0.05)
    assert r.method.startswith("measured: RAPL") and "1 package," in r.method


def test_laps_partition_the_total(powercap, clocks):
    root, z = powercap
    wall, cpu = clocks
    m = Meter(rapl_root=root, clock=wall, cpu_clock=cpu).start()  # auto picks readable RAPL for CPU work
    assert m.backend_name == "rapl"
    bump_uj(z["pkg0"], 1_000_000)
    first = m.lap(label=128)
    bump_uj(z["pkg1"], 4_000_000)
    second = m.lap(label=512)
    total = m.stop()
    assert (first.energy_j, second.energy_j, total.energy_j) == pytest.approx((1.0, 4.0, 5.0))
    assert [x.label for x in m.measurements] == ["128", "512"]


def test_default_backend_name_sees_readable_rapl(powercap):
    root, _ = powercap
    assert default_backend_name(rapl_root=root) == "rapl"


def _deny(monkeypatch, denied_path):
    real = backends._read_int

    def read_int(path):
        if os.fspath(path) == os.fspath(denied_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    # Simulated so the test also holds when run as root, for whom chmod does not deny reads.
    monkeypatch.setattr(backends, "_read_int", read_int)


def test_unreadable_counter_auto_falls_back_with_reason(powercap, monkeypatch):
    root, z = powercap
    denied = z["pkg1"] / "energy_uj"
    _deny(monkeypatch, denied)
    m = Meter(rapl_root=root)
    assert m.backend_name == "estimate"
    assert str(denied) in m.backend_reason and "permission denied" in m.backend_reason
    assert default_backend_name(rapl_root=root) == "estimate"


def test_unreadable_counter_explicit_rapl_raises_with_fix(powercap, monkeypatch):
    root, z = powercap
    denied = z["pkg1"] / "energy_uj"
    _deny(monkeypatch, denied)
    with pytest.raises(EnergyBackendError) as info:
        Meter("rapl", rapl_root=root)
    message = str(info.value)
    assert str(denied) in message and "root" in message and "chmod" in message


def test_env_backend_rapl_raises_when_unreadable(powercap, monkeypatch):
    root, z = powercap
    _deny(monkeypatch, z["pkg0"] / "energy_uj")
    monkeypatch.setenv("LEANSEQ_ENERGY_BACKEND", "rapl")
    with pytest.raises(EnergyBackendError, match="permission denied"):
        Meter(rapl_root=root)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads mode-000 files")
def test_real_permission_bits(powercap):
    root, z = powercap
    (z["pkg0"] / "energy_uj").chmod(0)
    assert Meter(rapl_root=root).backend_name == "estimate"
    with pytest.raises(EnergyBackendError, match="chmod"):
        Meter("rapl", rapl_root=root)


def test_missing_or_empty_tree(tmp_path):
    with pytest.raises(EnergyBackendError, match="no powercap tree"):
        Meter("rapl", rapl_root=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnergyBackendError, match="no RAPL package zones"):
        Meter("rapl", rapl_root=tmp_path / "empty")
    assert Meter(rapl_root=tmp_path / "empty").backend_name == "estimate"


def test_garbage_counter_is_an_error(tmp_path):
    root = tmp_path / "pc"
    root.mkdir()
    make_zone(root, "intel-rapl:0", "package-0", "not-a-number")
    with pytest.raises(EnergyBackendError, match="integer"):
        Meter("rapl", rapl_root=root)
