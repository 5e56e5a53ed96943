"""The Meter: wall time, process CPU time, peak memory, energy (with its method) and grams CO2e per window.

    with Meter() as m:            # one window
        work()
    print(m.result)               # "0.84 J (estimated: 0.125 CPU-s x 6.75 W/core, default watts); ..."

    meter = Meter()               # one window per benchmark point; the backend is chosen once, here
    for n in lengths:
        with meter.measure(label=n) as w:
            work(n)
        rows.append(w.result.to_dict())

    m = Meter().start(); ...; m.lap("prefill"); ...; m.lap("decode"); total = m.stop()
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from leanseq.energy.backends import (
    BACKENDS,
    ENV_CPU_WATTS,
    choose_backend,
    positive_float,
)

# Ember, Global Electricity Review 2023: world electricity generation averaged 436 gCO2/kWh in 2022.
DEFAULT_GRID_INTENSITY = 436.0
ENV_GRID_INTENSITY = "LEANSEQ_GRID_INTENSITY"
_JOULES_PER_KWH = 3.6e6


def resolve_grid_intensity(grid_intensity: float | None = None) -> float:
    """gCO2e per kWh: argument > LEANSEQ_GRID_INTENSITY > DEFAULT_GRID_INTENSITY."""
    if grid_intensity is not None:
        return _non_negative(grid_intensity, "grid_intensity")
    env = os.environ.get(ENV_GRID_INTENSITY)
    if env not in (None, ""):
        return _non_negative(env, ENV_GRID_INTENSITY)
    return DEFAULT_GRID_INTENSITY


def _non_negative(value, what: str) -> float:
    if value in (0, 0.0, "0"):
        return 0.0  # a zero-carbon grid is a legitimate setting
    return positive_float(value, what)


def grams_co2e(joules: float, grid_gco2e_per_kwh: float) -> float:
    return joules / _JOULES_PER_KWH * grid_gco2e_per_kwh


# ---- the result ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    wall_s: float
    cpu_s: float  # this process, all threads, user + system
    energy_j: float
    method: str  # "measured: ..." or "estimated: ..."; every printed figure carries it
    backend: str  # "rapl" | "nvml" | "estimate"
    co2e_g: float
    grid_gco2e_per_kwh: float
    peak_rss_bytes: int | None  # None where the platform cannot report it
    peak_rss_scope: str  # "window" (high-water mark reset at the start), "process lifetime" or "not tracked"
    rss_start_bytes: int | None
    cuda_peak_allocated_bytes: int | None  # None unless the work ran on CUDA
    device: str
    label: str | None = None

    @property
    def measured(self) -> bool:
        return self.method.startswith("measured")

    @property
    def avg_watts(self) -> float:
        return self.energy_j / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        parts = [
            f"{_fmt_joules(self.energy_j)} J ({self.method})",
            f"{self.co2e_g:.3g} gCO2e at {self.grid_gco2e_per_kwh:g} g/kWh",
            f"wall {self.wall_s:.3g} s",
            f"CPU {self.cpu_s:.3g} s",
        ]
        if self.peak_rss_bytes is not None:
            scope = "" if self.peak_rss_scope == "window" else f" ({self.peak_rss_scope})"
            parts.append(f"peak RSS {self.peak_rss_bytes / 2**20:.1f} MiB{scope}")
        if self.cuda_peak_allocated_bytes is not None:
            parts.append(f"CUDA peak {self.cuda_peak_allocated_bytes / 2**20:.1f} MiB")
        text = "; ".join(parts)
        return f"{self.label}: {text}" if self.label is not None else text

    __str__ = describe

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt_joules(j: float) -> str:
    return f"{j:.0f}" if abs(j) >= 100 else f"{j:.3g}"


# ---- peak memory ---------------------------------------------------------------------------------------------
def _proc_rss_kb() -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in KiB from one read of /proc/self/status; (None, None) where there is no /proc."""
    now = peak = None
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    now = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None, None
    return now, peak


def _rss_now_and_peak() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) in bytes. Linux: /proc (resettable); elsewhere getrusage's lifetime peak."""
    now_kb, peak_kb = _proc_rss_kb()
    if peak_kb is not None:
        return (now_kb * 1024 if now_kb is not None else None), peak_kb * 1024
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None, int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # macOS reports bytes, Linux KiB


def _reset_rss_peak() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS (proc(5)); nothing else changes.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# Windows open anywhere in this process. When one window resets a high-water mark, the peak seen so far is
# first carried into every other open window, so nested and overlapping windows stay correct.
_ACTIVE: list[_Window] = []
_LOCK = threading.Lock()


class _Window:
    __slots__ = ("cuda_carried", "cuda_index", "label", "rss_carried", "rss_scope", "rss_start", "start")

    def __init__(self, start, label, rss_start, rss_scope, cuda_index):
        self.start = start  # (wall, cpu, energy snapshot)
        self.label = label
        self.rss_carried = 0
        self.cuda_carried = 0
        self.rss_start = rss_start
        self.rss_scope = rss_scope  # "window" if the high-water mark was reset at the start
        self.cuda_index = cuda_index


class MeasureHandle:
    """What `Meter.measure()` yields; `.result` is filled in when the block exits."""

    def __init__(self, label):
        self.label = label
        self.result: Measurement | None = None


# ---- the meter -----------------------------------------------------------------------------------------------
class Meter:
    """Meter wall time, CPU time, peak memory and energy of the code inside it.

    backend: "auto" | "rapl" | "nvml" | "estimate" (default: env LEANSEQ_ENERGY_BACKEND, else "auto"); chosen
        once here. auto: NVML for CUDA work, else RAPL if its counters are readable, else the estimate;
        `backend_reason` says why.
    device: where the work runs ("cpu", "cuda", "cuda:1" or a torch.device). On CUDA the meter synchronizes
        at each boundary, so wall time and energy include queued kernels, and reports CUDA peak allocated.
    cpu_watts: watts per busy core for the estimate (default: env LEANSEQ_CPU_WATTS, else 6.75).
    grid_intensity: gCO2e per kWh (default: env LEANSEQ_GRID_INTENSITY, else 436, the 2022 world average).
    rapl_root: the powercap sysfs root (default /sys/class/powercap).
    reset_peak_rss: reset the process RSS high-water mark at each window start (Linux) so peak memory is
        per window; otherwise, or where that is impossible, the peak is the process-lifetime peak.
    track_rss: False: no memory reading at all (peak_rss_bytes None, scope "not tracked"); for many tiny windows
        (a server's rounds), where reading /proc twice a window costs more than the work measured.
    clock, cpu_clock: time sources (seconds), injectable for tests.
    """

    def __init__(
        self,
        backend: str | None = None,
        *,
        device=None,
        cpu_watts: float | None = None,
        grid_intensity: float | None = None,
        rapl_root: str | os.PathLike | None = None,
        reset_peak_rss: bool = True,
        track_rss: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
    ):
        self.device, self.cuda_index = _parse_device(device)
        self.grid_intensity = resolve_grid_intensity(grid_intensity)
        choice = choose_backend(backend, cuda_index=self.cuda_index, rapl_root=rapl_root, cpu_watts=cpu_watts)
        self.backend = choice.backend
        self.backend_reason = choice.reason
        self.reset_peak_rss = bool(reset_peak_rss)
        self.track_rss = bool(track_rss)
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._torch = None
        if self.cuda_index is not None:
            import torch  # only for CUDA work, which already has torch loaded

            self._torch = torch
        self._total: _Window | None = None
        self._lap: _Window | None = None
        self.result: Measurement | None = None  # set by stop() / leaving the `with` block
        self.measurements: list[Measurement] = []  # laps and measure() windows, in order

    # -- what will be used --
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def method(self) -> str:
        return self.backend.describe()

    def __repr__(self) -> str:
        return f"Meter(backend={self.backend_name!r}, device={self.device!r}, method={self.method!r})"

    # -- start / stop / lap --
    @property
    def running(self) -> bool:
        return self._total is not None

    def start(self) -> Meter:
        if self.running:
            raise RuntimeError("Meter.start(): already running; call stop() first")
        self._total, self._lap = self._open([None, None])
        return self

    def lap(self, label=None) -> Measurement:
        """Close the current lap (since start() or the previous lap), record it, and begin the next one."""
        if not self.running:
            raise RuntimeError("Meter.lap(): the meter is not running; call start() or use `with Meter() as m`")
        end = self._sample_end()
        (result,) = self._close([self._lap], end, labels=[label])
        (self._lap,) = self._open([None], reuse=end)
        self.measurements.append(result)
        return result

    def stop(self) -> Measurement:
        """End metering and return the whole window since start() (laps are in `measurements`)."""
        if not self.running:
            raise RuntimeError("Meter.stop(): the meter is not running")
        end = self._sample_end()
        self.result, _ = self._close([self._total, self._lap], end)
        self._total = self._lap = None
        return self.result

    def __enter__(self) -> Meter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextmanager
    def measure(self, label=None) -> Iterator[MeasureHandle]:
        """One independent window with this meter's backend: `with meter.measure(n) as w: ...; w.result`."""
        handle = MeasureHandle(label)
        (window,) = self._open([label])
        try:
            yield handle
        except BaseException:
            with _LOCK:
                _ACTIVE.remove(window)
            raise
        (handle.result,) = self._close([window], self._sample_end())
        self.measurements.append(handle.result)

    # -- internals --
    def _sync(self) -> None:
        if self._torch is not None:
            self._torch.cuda.synchronize(self.cuda_index)

    def _sample_start(self):
        self._sync()
        energy = self.backend.read()
        return self._clock(), self._cpu_clock(), energy

    def _sample_end(self):
        self._sync()
        wall, cpu = self._clock(), self._cpu_clock()
        return wall, cpu, self.backend.read()

    def _open(self, labels, reuse=None) -> list[_Window]:
        with _LOCK:
            rss_now, rss_peak = _rss_now_and_peak() if self.track_rss else (None, None)
            rss_reset = self.reset_peak_rss and rss_peak is not None and _reset_rss_peak()
            if rss_reset:
                for w in _ACTIVE:
                    w.rss_carried = max(w.rss_carried, rss_peak)
            if self._torch is not None:
                cuda_peak = int(self._torch.cuda.max_memory_allocated(self.cuda_index))
                for w in _ACTIVE:
                    if w.cuda_index == self.cuda_index:
                        w.cuda_carried = max(w.cuda_carried, cuda_peak)
                self._torch.cuda.reset_peak_memory_stats(self.cuda_index)
            start = reuse if reuse is not None else self._sample_start()
            scope = "window" if rss_reset else "process lifetime" if self.track_rss else "not tracked"
            windows = [_Window(start, label, rss_now, scope, self.cuda_index) for label in labels]
            _ACTIVE.extend(windows)
        return windows

    def _close(self, windows, end, labels=None) -> list[Measurement]:
        with _LOCK:
            for w in windows:
                _ACTIVE.remove(w)
            _, rss_peak = _rss_now_and_peak() if self.track_rss else (None, None)
            cuda_peak = None
            if self._torch is not None:
                cuda_peak = int(self._torch.cuda.max_memory_allocated(self.cuda_index))
        results = []
        for i, w in enumerate(windows):
            wall = end[0] - w.start[0]
            cpu = end[1] - w.start[1]
            joules, method = self.backend.energy_between(w.start[2], end[2], cpu)
            label = labels[i] if labels is not None and labels[i] is not None else w.label
            results.append(
                Measurement(
                    wall_s=wall,
                    cpu_s=cpu,
                    energy_j=joules,
                    method=method,
                    backend=self.backend.name,
                    co2e_g=grams_co2e(joules, self.grid_intensity),
                    grid_gco2e_per_kwh=self.grid_intensity,
                    peak_rss_bytes=None if rss_peak is None else max(rss_peak, w.rss_carried),
                    peak_rss_scope=w.rss_scope,
                    rss_start_bytes=w.rss_start,
                    cuda_peak_allocated_bytes=None if cuda_peak is None else max(cuda_peak, w.cuda_carried),
                    device=self.device,
                    label=None if label is None else str(label),
                )
            )
        return results


def _parse_device(device) -> tuple[str, int | None]:
    """("cuda:1", 1) for CUDA work, ("cpu", None) otherwise. Accepts None, a string or a torch.device."""
    if device is None:
        return "cpu", None
    kind = getattr(device, "type", None)
    if kind is not None:  # torch.device
        index = getattr(device, "index", None)
    elif isinstance(device, str):
        kind, _, idx = device.strip().lower().partition(":")
        if idx and not idx.isdigit():
            raise ValueError(f"device {device!r}: the index after ':' must be a non-negative integer")
        index = int(idx) if idx else None
    else:
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0' or a torch.device, got {type(device)}")
    if kind != "cuda":
        return kind if index is None else f"{kind}:{index}", None
    if index is None:
        import torch

        index = torch.cuda.current_device()
    return f"cuda:{index}", index


# ---- CLI helpers (the bench adds these flags) ----------------------------------------------------------------
def _positive_arg(what: str):
    def parse(text: str) -> float:
        try:
            return positive_float(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --energy-backend, --cpu-watts and --grid-intensity; unset flags fall through to the env vars."""
    group = parser.add_argument_group("energy")
    group.add_argument("--energy-backend", choices=BACKENDS, default=None,
                       help="how to get joules (default: $LEANSEQ_ENERGY_BACKEND or auto)")
    group.add_argument("--cpu-watts", type=_positive_arg("--cpu-watts"), default=None,
                       help=f"watts per busy core for the estimate (default: ${ENV_CPU_WATTS} or 6.75)")
    group.add_argument("--grid-intensity", type=_positive_arg("--grid-intensity"), default=None,
                       help=f"gCO2e per kWh (default: ${ENV_GRID_INTENSITY} or {DEFAULT_GRID_INTENSITY:g})")


def meter_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Meter(**meter_kwargs_from_args(args), device=...) for a parser set up by add_cli_arguments."""
    return {
        "backend": getattr(args, "energy_backend", None),
        "cpu_watts": getattr(args, "cpu_watts", None),
        "grid_intensity": getattr(args, "grid_intensity", None),
    }
