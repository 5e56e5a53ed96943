"""`leanseq train`: train a model on a synthetic task from a TOML config, with --set overrides."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a synthetic task (TOML config; works under torchrun)",
        description=(
            "Train a leanseq model on a synthetic task. Settings come from --config (sections [model], [task], "
            "[train], [output]) and --set section.key=value overrides; aliases d_model, n_layers, d_state, "
            "n_heads, d_ff map to the family's hidden_size, num_hidden_layers, state_size, "
            "num_attention_heads, intermediate_size. Example config: leanseq/configs/induction_mamba.toml. "
            "For several processes: torchrun --nproc_per_node N -m leanseq.cli train --config ..."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.steps=100 (repeatable)",
    )
    parser.set_defaults(func=_train)


def _train(args) -> int:
    from leanseq.train.config import load_config
    from leanseq.train.trainer import run

    config = load_config(args.config, args.overrides)
    summary = run(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 prints the summary
        summary["output_dir"] = config.output.dir
        print(json.dumps(summary))
    return 0
