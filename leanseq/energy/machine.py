"""What a report records about the machine it ran on: the CPU's name and the load other work put on it."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else name
    except OSError:
        return name


def load_average() -> float | None:
    """The 1-minute load average (other work slows what is measured: recorded, not corrected); None where the
    platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
