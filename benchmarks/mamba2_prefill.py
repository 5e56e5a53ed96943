"""Where a Mamba-2 prefill's time goes, with leanseq's no-grad fast paths on and off, in one process.

    python benchmarks/mamba2_prefill.py                 # 130m shape, 512 tokens, 2 threads, 6 rounds
    python benchmarks/mamba2_prefill.py --rounds 2 --tokens 128 --layers 4   # quicker

One `model(ids, logits="last")` per sample on a randomly initialised Mamba-2 with the 130m shape that
benchmarks/vs_llamacpp.py measures (hidden 768, 24 layers, 24 heads of 64, state 128, one group).
"fast" = what leanseq does by default: the projections through oneDNN with packed weights
(leanseq.ops.linear) and the compiled scan, conv + SiLU and gated RMSNorm (leanseq.ops.prefill_native);
"eager" = the same model with both switched off (MKL projections, the PyTorch scan). The two alternate,
order flipped every round; each part's wall time is summed over the layers by wrapping the mixer's calls,
and medians over rounds are printed with the projections' GFLOP/s and the share of each part.
Not part of make test; a busy machine slows both sides alike, so compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from leanseq.models import mamba2
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.ops import linear, prefill_native

SHAPE_130M = {"vocab_size": 50288, "hidden_size": 768, "num_hidden_layers": 24, "expand": 2, "head_dim": 64,
              "num_heads": 24, "n_groups": 1, "state_size": 128, "tie_word_embeddings": True}


def set_fast(flag: bool) -> None:
    linear.set_enabled(flag)
    prefill_native.set_enabled(flag)


def timed(name: str, fn, totals: dict):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - t
        return out
    return wrapper


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    if min(args.tokens, args.layers, args.threads, args.rounds) < 1:
        p.error("--tokens, --layers, --threads and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(**{**SHAPE_130M, "num_hidden_layers": args.layers})).eval()
    cfg = model.config

    totals: dict = collections.defaultdict(float)
    # wrap what the mixer calls (module globals and per-module forwards), so each part's wall time adds up
    mamba2.linear = timed("projections (in_proj, out_proj)", linear.linear, totals)
    mamba2.causal_conv1d = timed("conv + SiLU", mamba2.causal_conv1d, totals)
    mamba2.ssd_chunked = timed("SSD scan", mamba2.ssd_chunked, totals)
    for block in model.backbone.layers:
        block.mixer.norm.forward = timed("gated RMSNorm", block.mixer.norm.forward, totals)
        block.norm.forward = timed("block RMSNorm", block.norm.forward, totals)

    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    samples = {True: collections.defaultdict(list), False: collections.defaultdict(list)}
    with torch.no_grad():
        for flag in (True, False):  # warm-up: builds the kernels, packs the weights
            set_fast(flag)
            model(ids, logits="last")
        for r in range(args.rounds):
            for flag in ((True, False) if r % 2 else (False, True)):
                set_fast(flag)
                totals.clear()
                t = time.perf_counter()
                model(ids, logits="last")
                total = time.perf_counter() - t
                for name, v in totals.items():
                    samples[flag][name].append(v)
                samples[flag]["everything else"].append(total - sum(totals.values()))
                samples[flag]["total"].append(total)
    set_fast(None)

    proj_flop = 2 * args.tokens * args.layers * cfg.hidden_size * (
        model.backbone.layers[0].mixer.in_proj.out_features + cfg.intermediate_size)
    print(f"Mamba-2 130m shape, {args.layers} layers, {args.tokens} tokens, {args.threads} threads, "
          f"{args.rounds} rounds (medians, ms); projections: {proj_flop / 1e9:.1f} GFLOP")
    print(f"compiled kernels: {prefill_native.status()}; oneDNN linear available: {linear.available()}\n")
    print("| part | fast (ms) | share | eager (ms) | share |")
    print("|---|---|---|---|---|")
    med = {f: {k: statistics.median(v) for k, v in samples[f].items()} for f in (True, False)}
    for name in med[True]:
        row = [f"{med[f][name] * 1e3:.1f} | {100 * med[f][name] / med[f]['total']:.0f}%" for f in (True, False)]
        print(f"| {name} | {row[0]} | {row[1]} |")
    for f, label in ((True, "fast"), (False, "eager")):
        proj = med[f]["projections (in_proj, out_proj)"]
        print(f"{label}: {args.tokens / med[f]['total']:.0f} tokens/s; projections at {proj_flop / proj / 1e9:.0f} "
              f"GFLOP/s")


if __name__ == "__main__":
    main()
