"""Model selection for `leanseq dna classify` on janggu's TRAINING files only: the test files are never read.

    python benchmarks/dna_select.py                       # every candidate, seed 0
    python benchmarks/dna_select.py --only mamba-p1-k16 cnn --seeds 0 1

A validation split is carved from the training records (20% of the 100 kb windows, split seed 1, grouped as
leanseq.dna.classify.split_records does); each candidate trains on the other 80% and is scored by ROC-AUC on
the held-out windows. The results and the choice they led to are in docs/dna_classify.md. One torch thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from leanseq.dna.classify import split_records
from leanseq.dna.data import janggu_files
from leanseq.dna.fasta import read_labelled, stack_equal_length
from leanseq.dna.models import DNAClassifier, DNAConfig
from leanseq.dna.train import evaluate, fit

ONE_BLOCK = {"backbone": "mamba", "num_layers": 1, "pooling": "max", "conv_kernel": 8, "state_size": 4, "rc": "ph"}
# name -> (config, epochs, lr); "p" = bases per token (patch), "k" = bases each token's embedding reads
CANDIDATES = {
    "cnn": ({"backbone": "cnn", "cnn_filters": 30, "cnn_width": 21}, 15, 1e-2),
    "mamba-p2 (previous default)": ({**ONE_BLOCK, "hidden_size": 16, "patch": 2}, 8, 1e-2),
    "mamba-p2 ps 4 epochs (previous)": ({**ONE_BLOCK, "hidden_size": 16, "patch": 2, "rc": "ps"}, 4, 1e-2),
    "mamba-p2-k10 h14": ({**ONE_BLOCK, "hidden_size": 14, "patch": 2, "embed_width": 10}, 8, 1e-2),
    "mamba-p2-k10 h14 12 epochs": ({**ONE_BLOCK, "hidden_size": 14, "patch": 2, "embed_width": 10}, 12, 1e-2),
    "mamba-p2-k10 h14 ps 4 epochs": ({**ONE_BLOCK, "hidden_size": 14, "patch": 2, "embed_width": 10, "rc": "ps"},
                                     4, 1e-2),
    "mamba-p2-k16 h12": ({**ONE_BLOCK, "hidden_size": 12, "patch": 2, "embed_width": 16}, 8, 1e-2),
    "mamba-p2-k16 h12 state 8": ({**ONE_BLOCK, "hidden_size": 12, "patch": 2, "embed_width": 16, "state_size": 8},
                                 8, 1e-2),
    "mamba-p2-k20 h12": ({**ONE_BLOCK, "hidden_size": 12, "patch": 2, "embed_width": 20}, 8, 1e-2),
    "mamba-p2-k20 h16 expand 1": ({**ONE_BLOCK, "hidden_size": 16, "expand": 1, "patch": 2, "embed_width": 20},
                                  8, 1e-2),
    "mamba-p1-k10 h14": ({**ONE_BLOCK, "hidden_size": 14, "patch": 1, "embed_width": 10}, 8, 1e-2),
    "mamba-p1-k10 h14 lr 2e-2": ({**ONE_BLOCK, "hidden_size": 14, "patch": 1, "embed_width": 10}, 8, 2e-2),
    "mamba-p1-k14 h18 expand 1": ({**ONE_BLOCK, "hidden_size": 18, "expand": 1, "patch": 1, "embed_width": 14},
                                  8, 1e-2),
    "mamba-p1-k21 h12": ({**ONE_BLOCK, "hidden_size": 12, "patch": 1, "embed_width": 21}, 8, 1e-2),
    "mamba-p1-k16": ({**ONE_BLOCK, "hidden_size": 12, "patch": 1, "embed_width": 16}, 8, 1e-2),
    "mamba-p1-k16 12 epochs": ({**ONE_BLOCK, "hidden_size": 12, "patch": 1, "embed_width": 16}, 12, 1e-2),
    "mamba-p1-k16 lr 2e-2": ({**ONE_BLOCK, "hidden_size": 12, "patch": 1, "embed_width": 16}, 8, 2e-2),
    "mamba-p1-k16 ps 4 epochs": ({**ONE_BLOCK, "hidden_size": 12, "patch": 1, "embed_width": 16, "rc": "ps"}, 4, 1e-2),
    "mamba-p1-k16 ps 8 epochs": ({**ONE_BLOCK, "hidden_size": 12, "patch": 1, "embed_width": 16, "rc": "ps"}, 8, 1e-2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="candidate names (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    unknown = set(args.only or ()) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidate(s) {sorted(unknown)}; choose from {list(CANDIDATES)}")
    records, y, _ = read_labelled(janggu_files()["train"])
    train, val = split_records(records, 0.2, seed=1)
    x = stack_equal_length(records)
    print(f"{len(train)} training / {len(val)} validation records (janggu's training files only)")
    for name in args.only or CANDIDATES:
        config, epochs, lr = CANDIDATES[name]
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = DNAClassifier(DNAConfig(**config))
            start = time.perf_counter()
            fitted = fit(model, x[train], y[train], epochs=epochs, lr=lr, seed=seed, desc=f"{name} seed {seed}")
            auc = evaluate(model, x[val], y[val])["roc_auc"]
            print(f"{name}: {model.num_parameters():,} parameters, seed {seed}: validation ROC-AUC {auc:.4f}, "
                  f"final training loss {fitted.final_loss:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
