"""Writing a series command's outputs: atomic text files, PNG figures and the run's metadata."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from leanseq.models.checkpoint import write_file_atomic


def save_figure(fig, plt, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_metadata() -> dict:
    import numpy
    import torch

    import leanseq

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m": load,
            "versions": {"leanseq": leanseq.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
                         "python": platform.python_version()},
            "command_line": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_stream_report(results: dict, out: Path, stem: str, table, plot) -> dict:
    """The markdown table (with the command above and the run below), the JSON and the plot of a streaming
    workload (forecasting, anomaly detection); `table(results)` and `plot(results, path)` make its parts."""
    import json

    header = f"Produced by `{results['command']}`.\n\n" if results.get("command") else ""
    meta = results["metadata"]
    footer = (f"\nRun: {meta['date_utc']}, {meta['cpu']}, {results['config']['threads']} torch thread(s), "
              f"{results['total_wall_s'] / 60:.1f} min in all.\n")
    return {"table": write_file_atomic(out / f"{stem}.md", header + table(results) + footer),
            "json": write_file_atomic(out / f"{stem}.json", json.dumps(results, indent=1, default=str) + "\n"),
            "plot": plot(results, out / f"{stem}.png")}
