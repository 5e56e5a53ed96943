"""Energy meter: joules, grams CO2e, wall and CPU time and peak memory, each joule labelled with its method.

    from leanseq.energy import Meter
    with Meter() as m:
        model(input_ids)
    print(m.result)   # 0.84 J (estimated: 0.125 CPU-s x 6.75 W/core, default watts); 0.000102 gCO2e at ...

    meter = Meter(device="cuda")                 # backend chosen once, here
    for n in (128, 512, 2048):
        with meter.measure(label=n) as w:
            model(x[:, :n])
        print(w.result)                          # every line states "measured: ..." or "estimated: ..."

`Meter.start()/lap()/stop()` do the same without a `with` block; see leanseq/energy/meter.py.

Backends (argument `backend=`, else env LEANSEQ_ENERGY_BACKEND, else "auto"):
- "rapl": Linux powercap counters (root configurable, default /sys/class/powercap). Sums the package zones
  intel-rapl:N (named package-N) read as cumulative `energy_uj` at start and end; one wrap-around per window
  is corrected with `max_energy_range_uj` (a second wrap, after roughly range / package watts, typically tens
  of minutes, cannot be seen: meter long runs in laps); subzones intel-rapl:N:M and psys are skipped, as
  they overlap the packages. Whole-socket energy: other processes on the machine count too. Since 2020 (CVE-2020-8694) the
  counters are root-only; run as root or `sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj`.
- "nvml": the GPU's cumulative total-energy counter (nvmlDeviceGetTotalEnergyConsumption, millijoules,
  Volta and newer) through nvidia-ml-py (`pip install nvidia-ml-py`, or the `leanseq[nvml]` extra), imported
  only when this backend is used. Whole-GPU energy; CPU energy is not included.
- "estimate": process CPU seconds (all threads, user + system) x watts per busy core. The default, 6.75 W,
  is an Intel Xeon Platinum 8380's 270 W TDP over its 40 cores (Intel ARK), a typical 2021-era server part;
  set your own with `cpu_watts=`, env LEANSEQ_CPU_WATTS or the bench's --cpu-watts flag. It attributes
  energy to this process only and ignores idle, memory and uncore power, so it is a comparison aid, not a
  measurement; it is always labelled "estimated".
- "auto": for CUDA work, nvml; otherwise rapl if its counters are readable; else the estimate. We deviate
  from a fixed rapl-first order on CUDA because RAPL cannot see the GPU, which dominates. `Meter.backend_reason`
  and `describe_default_backend()` say what was chosen and why the others were skipped.

Grams CO2e = kWh x grid intensity. The default, 436 gCO2e/kWh, is the 2022 world-average carbon intensity
of electricity generation from Ember's Global Electricity Review 2023; override with `grid_intensity=`,
env LEANSEQ_GRID_INTENSITY or --grid-intensity with your grid's figure.

Peak memory: process peak RSS (Linux: the VmHWM high-water mark, reset per window through
/proc/self/clear_refs, so each window reports its own peak; elsewhere the process-lifetime peak, and the
result says so) and, on CUDA, torch's peak allocated bytes for the device.

Overhead: a few small file reads per window boundary; no threads, no polling, nothing probed at import.

Why not codecarbon or zeus: codecarbon polls machine-wide power in a background thread, drags in pandas,
requests and friends, and reaches for the network to locate the grid; zeus is GPU-centred with a large
dependency tree and needs a privileged daemon for unprivileged RAPL. Neither attributes CPU time to one
process, which is what the estimate (the common case on locked-down machines) needs.
"""

from leanseq.energy.backends import (
    BACKENDS,
    DEFAULT_CPU_WATTS_PER_CORE,
    EnergyBackendError,
    EstimateBackend,
    NvmlBackend,
    RaplBackend,
    choose_backend,
)
from leanseq.energy.meter import (
    DEFAULT_GRID_INTENSITY,
    Measurement,
    Meter,
    add_cli_arguments,
    grams_co2e,
    meter_kwargs_from_args,
    resolve_grid_intensity,
)


def default_backend_name(device=None, **kwargs) -> str:
    """The backend a Meter built with these arguments would use: "rapl", "nvml" or "estimate"."""
    return Meter(device=device, **kwargs).backend_name


def describe_default_backend(device=None, **kwargs) -> str:
    """One line for reports: the method a Meter would use here, and why (e.g. why RAPL was skipped)."""
    meter = Meter(device=device, **kwargs)
    return f"{meter.method} [{meter.backend_reason}]"


__all__ = [
    "BACKENDS",
    "DEFAULT_CPU_WATTS_PER_CORE",
    "DEFAULT_GRID_INTENSITY",
    "EnergyBackendError",
    "EstimateBackend",
    "Measurement",
    "Meter",
    "NvmlBackend",
    "RaplBackend",
    "add_cli_arguments",
    "choose_backend",
    "default_backend_name",
    "describe_default_backend",
    "grams_co2e",
    "meter_kwargs_from_args",
    "resolve_grid_intensity",
]
