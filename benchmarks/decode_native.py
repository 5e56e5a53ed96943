"""Native decode step vs eager, and int8 weights: tokens/s, achieved GB/s, tiny-model step time, int8 accuracy.

    python benchmarks/decode_native.py            # 130m-shape Mamba-1 and Mamba-2 (random weights), tiny demo
    python benchmarks/decode_native.py --quick    # fewer steps

Every ratio is measured in the same run (native / eager, int8 / float32 native). Times are the best of a few
short repeats (the machine may be shared); GB/s = weight bytes a step reads / step time. Not part of make test.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import leanseq
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.ops import decode
from leanseq.ops.quant import quantize_int8
from leanseq.tasks import get_task

DEMO = Path(leanseq.__file__).parent / "data" / "induction-mamba"


def step_time(model, native: bool, steps: int, repeats: int = 3, batch: int = 1) -> float:
    decode.set_enabled(native)
    best = float("inf")
    with torch.no_grad():
        state = model.init_state(batch)
        tok = torch.ones(batch, dtype=torch.long)
        model.step(tok, state)  # plan / build outside the timing
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                _, state = model.step(tok, state)
            best = min(best, (time.perf_counter() - t) / steps)
    decode.set_enabled(None)
    return best


def int8_accuracy(model, prompt, rest) -> tuple[float, float]:
    """(max |logit error| / max |logit|, greedy agreement) of int8 vs float32, both native, teacher-forced."""
    q = quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        _, sf = model(prompt, return_state=True)
        _, sq = q(prompt, return_state=True)
        err, agree, total = 0.0, 0, 0
        for t in range(rest.shape[1]):
            lf, sf = model.step(rest[:, t], sf)
            lq, sq = q.step(rest[:, t], sq)
            err = max(err, float((lq - lf).abs().max() / lf.abs().max()))
            agree += int((lq.argmax(-1) == lf.argmax(-1)).sum())
            total += rest.shape[0]
    return err, agree / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.quick else 8
    torch.manual_seed(0)
    shapes = {
        "Mamba-1 130m": MambaLM(MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280)),
        "Mamba-2 130m": Mamba2LM(Mamba2Config(hidden_size=768, num_hidden_layers=24, vocab_size=50280,
                                              state_size=128, head_dim=64, num_heads=24, n_groups=1)),
    }
    print(f"decode kernel: {decode.status()}")
    for name, model in shapes.items():
        model.eval()
        q = quantize_int8(copy.deepcopy(model))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            eager = step_time(model, False, max(2, steps // 3), repeats=2)
            nat = step_time(model, True, steps)
            nq = step_time(q, True, steps)
            fb, qb = model._native_decode_plan.weight_bytes, q._native_decode_plan.weight_bytes
            print(f"{name}, {threads} thread(s): eager {1 / eager:6.1f} tok/s | native {1 / nat:6.1f} tok/s "
                  f"({eager / nat:4.2f}x eager, {fb / nat / 1e9:5.1f} GB/s) | native int8 {1 / nq:6.1f} tok/s "
                  f"({nat / nq:4.2f}x float32 native, {qb / nq / 1e9:5.1f} GB/s)")
        ids = torch.randint(0, 50280, (2, 40), generator=torch.Generator().manual_seed(0))
        err, agree = int8_accuracy(model, ids[:, :24], ids[:, 24:])
        print(f"{name} random weights, int8 vs float32: max logit error {err:.4f} of max |logit|, "
              f"greedy agreement {agree:.3f}")
        del q
    torch.set_num_threads(1)
    tiny = leanseq.load(DEMO)
    eager = step_time(tiny, False, 200)
    nat = step_time(tiny, True, 2000, repeats=5)
    print(f"tiny demo Mamba ({tiny.num_parameters()} params), 1 thread: model.step eager {eager * 1e6:.1f} us, "
          f"native {nat * 1e6:.1f} us ({eager / nat:.1f}x)")
    inputs, _, _ = get_task("induction_heads", seq_len=256).generate(16, torch.Generator().manual_seed(0))
    err, agree = int8_accuracy(tiny, inputs[:, :192], inputs[:, 192:])
    print(f"tiny demo Mamba (trained, induction heads), int8 vs float32: max logit error {err:.4f} of max "
          f"|logit|, greedy agreement {agree:.3f} over {16 * 64} steps")
    W = torch.randn(50280, 768)
    x = torch.randn(1, 768)
    for threads in (1, 2):
        best_g = best_s = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            decode.gemv(W, x, threads=threads)
            best_g = min(best_g, time.perf_counter() - t)
            t = time.perf_counter()
            W.sum()
            best_s = min(best_s, time.perf_counter() - t)
        print(f"lm_head-shape gemv (50280 x 768 float32), {threads} thread(s): {W.nbytes / best_g / 1e9:.1f} GB/s; "
              f"torch W.sum() bandwidth probe {W.nbytes / best_s / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
