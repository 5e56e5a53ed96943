"""Native decode step vs eager, and int8 weights: tokens/s, achieved GB/s, tiny-model step time, int8 accuracy.

    python benchmarks/decode_native.py            # 130m-shape Mamba-1 and Mamba-2 (random weights), tiny demo,
                                                  # Llama 135m shape (SmolLM-135M) at depth 0 and 4096
    python benchmarks/decode_native.py --quick    # fewer steps
    python benchmarks/decode_native.py --only llama   # just the transformer baseline

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
from leanseq.models.transformer import TransformerConfig, TransformerLM
from leanseq.ops import decode
from leanseq.ops.quant import Int8Linear, quantize_int8
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


def llama_state(model, depth: int, steps: int):
    """A KV cache `depth` tokens deep (random contents: a decode step's cost does not depend on the values),
    with room for the timed steps so no capacity doubling lands inside the timing."""
    state = model.init_state(1, capacity=depth + steps + 8)
    state.k.normal_()
    state.v.normal_()
    state.position.fill_(depth)
    return state


def llama_step_time(model, native: bool, depth: int, steps: int, repeats: int = 3) -> float:
    decode.set_enabled(native)
    best = float("inf")
    tok = torch.ones(1, dtype=torch.long)
    with torch.no_grad():
        model.step(tok, llama_state(model, depth, 1))  # plan / build outside the timing
        for _ in range(repeats):
            state = llama_state(model, depth, steps)
            t = time.perf_counter()
            for _ in range(steps):
                _, state = model.step(tok, state)
            best = min(best, (time.perf_counter() - t) / steps)
    decode.set_enabled(None)
    return best


def llama(steps: int) -> None:
    """The transformer baseline at the Llama 135m shape (SmolLM-135M: 30 layers, 9 heads / 3 kv heads of 64,
    hidden 576, intermediate 1536, vocab 49152, tied), random weights, batch 1."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192)).eval()
    q = quantize_int8(copy.deepcopy(model))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for depth in (0, 4096):
            eager = llama_step_time(model, False, depth, max(2, steps // 3), repeats=2)
            nat = llama_step_time(model, True, depth, steps)
            nq = llama_step_time(q, True, depth, steps)
            fb, qb = model._native_decode_plan.weight_bytes, q._native_decode_plan.weight_bytes
            kv = 2 * 30 * 3 * 64 * 4 * (depth + 1)  # the cache bytes a step reads
            print(f"Llama 135m shape, depth {depth}, {threads} thread(s): eager {1 / eager:6.1f} tok/s | native "
                  f"{1 / nat:6.1f} tok/s ({eager / nat:4.2f}x eager, {(fb + kv) / nat / 1e9:5.1f} GB/s) | native int8 "
                  f"{1 / nq:6.1f} tok/s ({nat / nq:4.2f}x float32 native, {(qb + kv) / nq / 1e9:5.1f} GB/s)")
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    err, agree = int8_accuracy(model, ids[:, :24], ids[:, 24:])
    print(f"Llama 135m shape random weights, int8 vs float32: max logit error {err:.4f} of max |logit|, "
          f"greedy agreement {agree:.3f}")


def bandwidth() -> None:
    """The kernel's gemv against torch's W.sum() (a bandwidth probe) on the same matrix, in the same run."""
    W = torch.randn(50280, 768)
    Wq = Int8Linear.from_float(W)
    x = torch.randn(1, 768)
    for threads in (1, 2):
        best_g = best_q = best_s = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            decode.gemv(W, x, threads=threads)
            best_g = min(best_g, time.perf_counter() - t)
            t = time.perf_counter()
            decode.gemv(Wq.qweight, x, Wq.scale, threads=threads)
            best_q = min(best_q, time.perf_counter() - t)
            t = time.perf_counter()
            W.sum()
            best_s = min(best_s, time.perf_counter() - t)
        print(f"lm_head-shape gemv (50280 x 768), {threads} thread(s): float32 {W.nbytes / best_g / 1e9:.1f} GB/s, "
              f"int8 {Wq.qweight.nbytes / best_q / 1e9:.1f} GB/s ({W.nbytes / best_q / 1e9:.1f} float32-equivalent); "
              f"torch W.sum() bandwidth probe {W.nbytes / best_s / 1e9:.1f} GB/s")


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
    ap.add_argument("--only", choices=("mamba", "llama", "gemv"), help="run one part")
    args = ap.parse_args()
    steps = 3 if args.quick else 8
    print(f"decode kernel: {decode.status()}")
    if args.only == "llama":
        llama(steps)
        return
    if args.only == "gemv":
        bandwidth()
        return
    torch.manual_seed(0)
    shapes = {
        "Mamba-1 130m": MambaLM(MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280)),
        "Mamba-2 130m": Mamba2LM(Mamba2Config(hidden_size=768, num_hidden_layers=24, vocab_size=50280,
                                              state_size=128, head_dim=64, num_heads=24, n_groups=1)),
    }
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
    if args.only != "mamba":
        llama(steps)
    bandwidth()


if __name__ == "__main__":
    main()
