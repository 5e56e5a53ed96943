"""Energy sources for the Meter: RAPL counters, the NVML GPU counter, and a CPU-time estimate.

Each backend reads an opaque snapshot with `read()` and turns two snapshots into
`(joules, method_label)` with `energy_between(start, end, cpu_s)`. The label always says whether the figure
is measured or estimated and by what. `choose_backend()` resolves "auto" once, when a Meter is created;
nothing here touches sysfs or imports pynvml at import time.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("auto", "rapl", "nvml", "estimate")
DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
# Intel Xeon Platinum 8380 (Ice Lake-SP, a common 2021-era server part): 270 W TDP / 40 cores.
DEFAULT_CPU_WATTS_PER_CORE = 270.0 / 40.0
ENV_BACKEND = "LEANSEQ_ENERGY_BACKEND"
ENV_CPU_WATTS = "LEANSEQ_CPU_WATTS"

# Top-level package zones only: "intel-rapl:0" but not the subzone "intel-rapl:0:0" (core, uncore, dram),
# which is already inside its package's counter, nor "intel-rapl-mmio:0", a second view of package 0.
_PACKAGE_ZONE = re.compile(r"^intel-rapl:(\d+)$")


class EnergyBackendError(RuntimeError):
    """The requested energy backend cannot be used on this machine; the message says why and how to fix it."""


def positive_float(value, what: str) -> float:
    """Parse a positive finite float or raise ValueError naming `what` (an argument or env var)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return number


def resolve_cpu_watts(cpu_watts: float | None = None) -> tuple[float, str]:
    """(watts per busy core, where that number came from): argument > LEANSEQ_CPU_WATTS > default."""
    if cpu_watts is not None:
        return positive_float(cpu_watts, "cpu_watts"), "cpu_watts="
    env = os.environ.get(ENV_CPU_WATTS)
    if env not in (None, ""):
        return positive_float(env, ENV_CPU_WATTS), ENV_CPU_WATTS
    return DEFAULT_CPU_WATTS_PER_CORE, "default"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ---- estimate ------------------------------------------------------------------------------------------------
class EstimateBackend:
    """Joules = process CPU seconds x watts per busy core. Attributes energy to this process only."""

    name = "estimate"
    measured = False

    def __init__(self, cpu_watts: float | None = None):
        self.watts, self.watts_source = resolve_cpu_watts(cpu_watts)

    def read(self):
        return None

    def energy_between(self, start, end, cpu_s: float) -> tuple[float, str]:
        label = f"estimated: {_fmt(cpu_s)} CPU-s x {self.watts:g} W/core, {self.watts_source} watts"
        return cpu_s * self.watts, label

    def describe(self) -> str:
        return f"estimated: process CPU-s x {self.watts:g} W/core ({self.watts_source} watts)"


# ---- RAPL ----------------------------------------------------------------------------------------------------
def _read_int(path: Path) -> int:
    # One small sysfs read; kept as a module function so tests can simulate permission errors as root.
    with open(path) as f:
        return int(f.read().strip())


@dataclass(frozen=True)
class RaplZone:
    name: str  # e.g. "package-0"
    energy_path: Path
    max_range_uj: int


def find_rapl_packages(root: str | os.PathLike = DEFAULT_POWERCAP_ROOT) -> list[RaplZone]:
    """The readable RAPL package zones under `root`, or EnergyBackendError saying exactly what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise EnergyBackendError(f"no powercap tree at {root} (RAPL needs Linux with the intel_rapl driver)")
    zones = []
    for zone_dir in sorted(root.iterdir(), key=lambda p: p.name):
        match = _PACKAGE_ZONE.match(zone_dir.name)
        if not match:
            continue
        name_file = zone_dir / "name"
        name = name_file.read_text().strip() if name_file.is_file() else f"package-{match.group(1)}"
        if not name.startswith("package"):
            continue  # e.g. "psys" (whole platform) overlaps the package zones; counting it would double count
        energy_path = zone_dir / "energy_uj"
        range_path = zone_dir / "max_energy_range_uj"
        for path in (energy_path, range_path):
            try:
                _read_int(path)
            except PermissionError:
                raise EnergyBackendError(
                    f"cannot read {path}: permission denied (Linux restricts RAPL counters to root since 2020). "
                    f"Run as root, or grant read access: sudo chmod a+r {root}/intel-rapl:*/energy_uj"
                ) from None
            except FileNotFoundError:
                raise EnergyBackendError(f"RAPL zone {zone_dir} has no {path.name}") from None
            except ValueError:
                raise EnergyBackendError(f"{path} does not hold an integer counter") from None
        zones.append(RaplZone(name, energy_path, _read_int(range_path)))
    if not zones:
        raise EnergyBackendError(f"no RAPL package zones (intel-rapl:N named package-N) under {root}")
    return zones


class RaplBackend:
    """Sum of the package zones' cumulative `energy_uj` counters: whole sockets, so it includes other processes."""

    name = "rapl"
    measured = True

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or DEFAULT_POWERCAP_ROOT)
        self.zones = find_rapl_packages(self.root)

    def read(self) -> tuple[int, ...]:
        return tuple(_read_int(z.energy_path) for z in self.zones)

    def energy_between(self, start, end, cpu_s: float) -> tuple[float, str]:
        total_uj = 0
        for zone, a, b in zip(self.zones, start, end):
            delta = b - a
            if delta < 0:  # the counter wrapped past max_energy_range_uj once (more wraps are undetectable)
                delta += zone.max_range_uj
            total_uj += delta
        return total_uj * 1e-6, self.describe()

    def describe(self) -> str:
        n = len(self.zones)
        return f"measured: RAPL package counters, {n} package{'s' if n > 1 else ''}, whole socket"


# ---- NVML ----------------------------------------------------------------------------------------------------
def import_pynvml():
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise EnergyBackendError(
            "the nvml energy backend needs NVIDIA's NVML bindings: pip install nvidia-ml-py "
            "(or pip install 'leanseq[nvml]')"
        ) from None


class NvmlBackend:
    """The GPU's cumulative total-energy counter (millijoules, Volta and newer); whole GPU, all processes."""

    name = "nvml"
    measured = True

    def __init__(self, cuda_index: int = 0):
        pynvml = import_pynvml()
        self._nvml = pynvml
        self.cuda_index = cuda_index
        try:
            pynvml.nvmlInit()
            self.handle, self.gpu = _nvml_handle(pynvml, cuda_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # fails early if the GPU lacks the counter
        except pynvml.NVMLError as exc:
            raise EnergyBackendError(f"NVML cannot read the energy counter of CUDA device {cuda_index}: {exc}") from None

    def read(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def energy_between(self, start, end, cpu_s: float) -> tuple[float, str]:
        return (end - start) * 1e-3, self.describe()

    def describe(self) -> str:
        return f"measured: NVML GPU energy counter, {self.gpu}, whole GPU"


def _nvml_handle(pynvml, cuda_index: int):
    """NVML numbers GPUs physically; CUDA numbers them through CUDA_VISIBLE_DEVICES. Map one to the other."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    if not entries:
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index), f"GPU {cuda_index}"
    if cuda_index >= len(entries):
        raise EnergyBackendError(f"CUDA device {cuda_index} is not in CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[cuda_index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry)), f"GPU {entry}"
    return pynvml.nvmlDeviceGetHandleByUUID(entry), f"GPU {entry}"


# ---- choice --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendChoice:
    backend: object  # one of the backend classes above
    reason: str  # why this one: "requested", or what auto tried and why it moved on


def requested_backend(backend: str | None = None) -> str:
    """The backend name asked for: argument > LEANSEQ_ENERGY_BACKEND > "auto"."""
    if backend is None:
        backend = os.environ.get(ENV_BACKEND) or "auto"
        where = ENV_BACKEND
    else:
        where = "backend"
    name = str(backend).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not an energy backend; choose one of {', '.join(BACKENDS)}")
    return name


def choose_backend(
    backend: str | None = None,
    *,
    cuda_index: int | None = None,
    rapl_root: str | os.PathLike | None = None,
    cpu_watts: float | None = None,
) -> BackendChoice:
    """Build the backend once. `cuda_index` is None for CPU work, else the CUDA device the work runs on.

    auto: for CUDA work, NVML first (the GPU dominates the energy and RAPL cannot see it), then RAPL, then the
    estimate; for CPU work, RAPL then the estimate. An explicit backend that cannot work raises
    EnergyBackendError; auto records why it skipped each one.
    """
    name = requested_backend(backend)
    if name == "rapl":
        return BackendChoice(RaplBackend(rapl_root), "requested")
    if name == "nvml":
        return BackendChoice(NvmlBackend(0 if cuda_index is None else cuda_index), "requested")
    if name == "estimate":
        return BackendChoice(EstimateBackend(cpu_watts), "requested")

    skipped = []
    if cuda_index is not None:
        try:
            return BackendChoice(NvmlBackend(cuda_index), "auto: NVML energy counter for CUDA work")
        except EnergyBackendError as exc:
            skipped.append(f"nvml unavailable ({exc})")
    try:
        rapl = RaplBackend(rapl_root)
        return BackendChoice(rapl, "; ".join(skipped + ["auto: RAPL counters readable"]))
    except EnergyBackendError as exc:
        skipped.append(f"rapl unavailable ({exc})")
    estimate = EstimateBackend(cpu_watts)
    return BackendChoice(estimate, "auto fell back to the CPU-time estimate: " + "; ".join(skipped))
