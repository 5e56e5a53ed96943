"""Per-token decode latency of the bundled byte-level Mamba against a transformer of about its size, at growing
positions in one stream (the issue's check: flat from the 1st token to the 100,000th for the SSM).

    python benchmarks/text_latency.py                      # positions 1, 1,000, 10,000, 100,000
    python benchmarks/text_latency.py --transformer-max 16384   # skip the slow 100,000-token transformer prefill

At each position P the stream is first brought to P tokens (a chunked prefill of random bytes, untimed), then
`--steps` single-token steps are timed (median wall ms per token; 2 torch threads). The transformer (random
weights, the `leanseq lm race` shape: 3 layers x 128, SwiGLU 240, 506,880 parameters) is measured at the positions
up to --transformer-max, since its prefill grows with the square of P.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def stream_to(model, position: int, chunk: int = 4096):
    """A state after `position` random byte tokens (chunked prefill: memory stays bounded)."""
    g = torch.Generator().manual_seed(position)
    state = model.init_state(1)
    done = 0
    while done < position:
        n = min(chunk, position - done)
        ids = torch.randint(0, 256, (1, n), generator=g)
        _, state = model(ids, state=state, return_state=True, logits="last")
        done += n
    return state


def step_ms(model, state, steps: int) -> float:
    tok = torch.tensor([65])
    for _ in range(3):  # warm-up at this position
        logits, state = model.step(tok, state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, state = model.step(tok, state)
        times.append(time.perf_counter() - t0)
        tok = logits.argmax(-1)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    from leanseq.models.commands import bundled_checkpoint
    from leanseq.models.transformer import TransformerConfig, TransformerLM
    from leanseq.text import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", default="1,1000,10000,100000")
    p.add_argument("--transformer-max", type=int, default=100000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mamba, _ = load(bundled_checkpoint("shakespeare-mamba"))
    torch.manual_seed(0)
    transformer = TransformerLM(TransformerConfig(vocab_size=257, hidden_size=128, intermediate_size=240,
                                                  num_hidden_layers=3, num_attention_heads=4)).eval()
    positions = [int(x) for x in args.positions.split(",")]
    rows = []
    with torch.no_grad():
        for pos in positions:
            m = step_ms(mamba, stream_to(mamba, pos - 1), args.steps)
            t = step_ms(transformer, stream_to(transformer, pos - 1), args.steps) \
                if pos <= args.transformer_max else None
            rows.append((pos, m, t))
            print(f"position {pos:>7,}: mamba {m:.3f} ms/token"
                  + (f", transformer {t:.3f} ms/token" if t is not None else ", transformer not run"), flush=True)
    first = rows[0][1]
    print(f"mamba latency at position {rows[-1][0]:,} / at {rows[0][0]:,}: {rows[-1][1] / first:.2f}x; "
          f"{1e3 / rows[-1][1]:.0f} tokens/s there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
