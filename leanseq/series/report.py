"""Writing a series command's outputs: atomic text files, PNG figures and the run's metadata."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from leanseq.energy.machine import cpu_name, load_average
from leanseq.fileio import save_figure_atomic
from leanseq.models.checkpoint import write_file_atomic


def save_figure(fig, plt, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = save_figure_atomic(fig, path, format="png", dpi=100)
    plt.close(fig)
    return path


def run_metadata() -> dict:
    import numpy
    import torch

    import leanseq

    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average_1m": load_average(),
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
