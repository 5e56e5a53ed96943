"""`leanseq series ...`: the time-series commands. Each workload module adds its own subcommand here.

The group is made once (`register`, called by leanseq.cli); every module in SUBCOMMAND_MODULES defines
`add_subcommand(series_subparsers)` that adds one subcommand and sets its `func`. A new workload (forecasting,
anomaly detection) adds its module to that list.
"""

from __future__ import annotations

import importlib

from leanseq.argtypes import command_group

SUBCOMMAND_MODULES = [
    "leanseq.series.classify_commands",
    "leanseq.series.stream_commands",
]


def register(subparsers) -> None:
    series_sub = command_group(subparsers, "series", metavar="TASK",
                               help="time series: classification and more, against the usual tools",
                               description="Time-series workloads measured side by side with the methods "
                               "practitioners use, on datasets that ship inside installed packages.")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(series_sub)
