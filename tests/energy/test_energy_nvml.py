"""NVML backend with a fake `pynvml` module, and the CUDA paths of the Meter with torch.cuda stubbed."""

import sys
import types

import pytest

from leanseq.energy import EnergyBackendError, Meter, default_backend_name


class FakeNvml(types.ModuleType):
    """The slice of pynvml the backend uses; energy counters in millijoules per physical GPU index."""

    class NVMLError(Exception):
        pass

    def __init__(self, n_gpus=8, supported=True):
        super().__init__("pynvml")
        self.counters_mj = {i: 10_000 * (i + 1) for i in range(n_gpus)}
        self.uuids = {f"GPU-{i:04d}": i for i in range(n_gpus)}
        self.supported = supported
        self.init_calls = 0

    def nvmlInit(self):
        self.init_calls += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.counters_mj:
            raise self.NVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise self.NVMLError("Not Found")
        return ("handle", self.uuids[uuid])

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise self.NVMLError("Not Supported")
        return self.counters_mj[handle[1]]


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stub torch.cuda so the Meter's CUDA path (sync, peak allocated) runs on a CPU-only build."""
    torch = pytest.importorskip("torch")
    state = {"peak": {}, "syncs": 0, "current": 0}

    def synchronize(device=None):
        state["syncs"] += 1

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"].get(device, 0))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state["peak"].pop(device, None))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    return state


def test_explicit_nvml_reads_the_energy_counter(fake_nvml, clocks):
    wall, cpu = clocks
    m = Meter("nvml", clock=wall, cpu_clock=cpu).start()
    fake_nvml.counters_mj[0] += 1_500
    wall.advance(0.5)
    r = m.stop()
    assert r.energy_j == pytest.approx(1.5)
    assert r.backend == "nvml" and r.measured
    assert r.method == "measured: NVML GPU energy counter, GPU 0, whole GPU"
    assert "1.5 J (measured: NVML" in str(r)
    assert fake_nvml.init_calls == 1


def test_auto_on_cuda_picks_nvml_and_maps_visible_devices(fake_nvml, fake_cuda, clocks, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    wall, cpu = clocks
    meter = Meter(device="cuda:1", clock=wall, cpu_clock=cpu)  # CUDA device 1 is physical GPU 5
    assert meter.backend_name == "nvml" and meter.device == "cuda:1"
    with meter.measure("decode") as w:
        fake_nvml.counters_mj[5] += 2_000
        fake_nvml.counters_mj[3] += 99_000  # another GPU: not ours
        fake_cuda["peak"][1] = 3 << 20
    r = w.result
    assert r.energy_j == pytest.approx(2.0) and "GPU 5" in r.method
    assert r.cuda_peak_allocated_bytes == 3 << 20
    assert "CUDA peak 3.0 MiB" in str(r)
    assert fake_cuda["syncs"] >= 2  # queued kernels are inside the window


def test_cuda_peak_is_per_window_and_nested(fake_nvml, fake_cuda):
    meter = Meter("nvml", device="cuda")  # index from torch.cuda.current_device()
    assert meter.device == "cuda:0"
    with meter.measure() as outer:
        with meter.measure() as big:
            fake_cuda["peak"][0] = 100
        with meter.measure() as small:  # resets the peak; the outer window keeps the 100
            fake_cuda["peak"][0] = 10
    assert (big.result.cuda_peak_allocated_bytes, small.result.cuda_peak_allocated_bytes) == (100, 10)
    assert outer.result.cuda_peak_allocated_bytes == 100


def test_uuid_in_visible_devices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0002")
    m = Meter("nvml").start()
    fake_nvml.counters_mj[2] += 700
    assert m.stop().energy_j == pytest.approx(0.7)


def test_missing_pynvml_names_the_package(monkeypatch, fake_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(EnergyBackendError, match="pip install nvidia-ml-py"):
        Meter("nvml")
    meter = Meter(device="cuda:0", rapl_root="/nonexistent")  # auto falls back, saying why
    assert meter.backend_name == "estimate"
    assert "nvml unavailable" in meter.backend_reason and "nvidia-ml-py" in meter.backend_reason
    assert default_backend_name(device="cuda:0", rapl_root="/nonexistent") == "estimate"


def test_gpu_without_energy_counter(monkeypatch, fake_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(supported=False))
    with pytest.raises(EnergyBackendError, match="Not Supported"):
        Meter("nvml")
    assert Meter(device="cuda:0", rapl_root="/nonexistent").backend_name == "estimate"


def test_cpu_work_never_imports_pynvml(monkeypatch):
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    Meter(rapl_root="/nonexistent")
    assert "pynvml" not in sys.modules
