"""Prefill and decode speed and peak memory: leanseq against transformers on the same random weights.

    python benchmarks/prefill_decode.py                      # both families, both shapes (several minutes)
    python benchmarks/prefill_decode.py --shapes small --lengths 512

For each family (Mamba-1, Mamba-2) and shape, one random checkpoint is written by transformers; each
implementation then loads it in a fresh worker process (so peak memory is its own), alternating
leanseq / transformers, and measures with torch threads = 2:
  - prefill tokens/s for one forward over L tokens (all logits, no cache), at each L;
  - decode tokens/s after a 128-token prompt: (time to generate N tokens - time to generate 1) / (N - 1),
    greedy, so neither side is charged for its prefill;
  - peak resident memory above the loaded model (VmHWM, reset before each phase), and the weights' size.
Figures are ratios within one run: the machine's speed drifts, so only side-by-side numbers mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # name: (hidden_size, num_hidden_layers)
    "small": (256, 4),
    "130m": (768, 24),
}
VOCAB = {"mamba": 50280, "mamba2": 50288}


def hf_config(family: str, hidden: int, layers: int):
    import transformers

    if family == "mamba":
        return transformers.MambaConfig(vocab_size=VOCAB[family], hidden_size=hidden, num_hidden_layers=layers)
    return transformers.Mamba2Config(
        vocab_size=VOCAB[family], hidden_size=hidden, num_hidden_layers=layers, expand=2, head_dim=64,
        num_heads=2 * hidden // 64, n_groups=1, state_size=128, chunk_size=256, tie_word_embeddings=True,
    )


def make_checkpoint(family: str, shape: str, folder: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    hidden, layers = SHAPES[shape]
    cfg = hf_config(family, hidden, layers)
    cls = transformers.MambaForCausalLM if family == "mamba" else transformers.Mamba2ForCausalLM
    path = folder / f"{family}-{shape}"
    cls(cfg).save_pretrained(path)
    return path


# ---- worker (runs in its own process) ---------------------------------------------------------------------
def _rss_peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def worker(impl: str, ckpt: str, lengths: list[int], prompt_len: int, new_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "leanseq":
        import leanseq

        model = leanseq.load(ckpt)

        def forward(x):
            return model(x)

        def generate(x, n):
            return model.generate(x, n, temperature=0, ignore_eos=True)
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()

        def forward(x):
            return model(x, use_cache=False).logits

        def generate(x, n):
            return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    vocab = model.config.vocab_size
    out = {"impl": impl, "weights_bytes": weights, "prefill": {}, "peak_bytes": {}}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        forward(torch.randint(0, vocab, (1, 32), generator=g))  # warm-up: lazy init, allocator
        base = _status_kb("VmRSS")
        prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
        _rss_peak_reset()
        generate(prompt, 2)
        t0 = time.perf_counter()
        one = generate(prompt, 1)
        t1 = time.perf_counter()
        many = generate(prompt, new_tokens)
        t2 = time.perf_counter()
        assert many.shape[1] == prompt_len + new_tokens and one.shape[1] == prompt_len + 1
        out["decode_tokens_per_s"] = (new_tokens - 1) / ((t2 - t1) - (t1 - t0))
        out["decode_tokens"] = many[0, prompt_len:].tolist()
        out["peak_bytes"]["decode"] = (_status_kb("VmHWM") - base) * 1024
        for length in lengths:
            x = torch.randint(0, vocab, (1, length), generator=g)
            _rss_peak_reset()
            t0 = time.perf_counter()
            logits = forward(x)
            elapsed = time.perf_counter() - t0
            out["prefill"][str(length)] = length / elapsed
            out["peak_bytes"][f"prefill_{length}"] = (_status_kb("VmHWM") - base) * 1024
            out.setdefault("last_logits", {})[str(length)] = logits[0, -1, :8].tolist()
    return out


def run_worker(impl: str, ckpt: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--ckpt", str(ckpt), "--lengths",
           ",".join(map(str, args.lengths)), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="mamba,mamba2")
    p.add_argument("--shapes", default="small,130m")
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="leanseq-out/prefill_decode.json")
    p.add_argument("--worker", choices=["leanseq", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.lengths, args.prompt_len, args.new_tokens, args.threads)))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for shape in args.shapes.split(","):
                ckpt = make_checkpoint(family, shape, Path(tmp))
                row = {"family": family, "shape": shape}
                for impl in ("leanseq", "transformers"):  # alternate per configuration
                    print(f"[{family} {shape}] {impl} ...", file=sys.stderr, flush=True)
                    row[impl] = run_worker(impl, ckpt, args)
                ours, theirs = row["leanseq"], row["transformers"]
                row["same_greedy_tokens"] = ours["decode_tokens"] == theirs["decode_tokens"]
                results.append(row)
                print_row(row, args.lengths)
    print_summary(results, args.lengths)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "lengths": args.lengths, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "command": " ".join(sys.argv)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


def print_row(row, lengths) -> None:
    ours, theirs = row["leanseq"], row["transformers"]
    mb = 1 / 2**20
    print(f"\n{row['family']} {row['shape']}  (weights {ours['weights_bytes'] * mb:.0f} MiB; "
          f"greedy decode tokens identical: {row['same_greedy_tokens']})")
    print(f"  {'metric':<26}{'leanseq':>14}{'transformers':>14}{'ratio':>9}")
    for length in lengths:
        a, b = ours["prefill"][str(length)], theirs["prefill"][str(length)]
        print(f"  {'prefill tok/s L=' + str(length):<26}{a:>14.1f}{b:>14.1f}{a / b:>8.1f}x")
    a, b = ours["decode_tokens_per_s"], theirs["decode_tokens_per_s"]
    print(f"  {'decode tok/s':<26}{a:>14.1f}{b:>14.1f}{a / b:>8.1f}x")
    for phase in ours["peak_bytes"]:
        a, b = ours["peak_bytes"][phase] * mb, theirs["peak_bytes"][phase] * mb
        print(f"  {'peak MiB ' + phase:<26}{a:>14.0f}{b:>14.0f}")


def print_summary(results, lengths) -> None:
    print("\nsummary (leanseq / transformers, same run):")
    for row in results:
        ours, theirs = row["leanseq"], row["transformers"]
        pre = ", ".join(f"L={n}: {ours['prefill'][str(n)] / theirs['prefill'][str(n)]:.1f}x" for n in lengths)
        dec = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        longest = max(lengths)
        peak = ours["peak_bytes"][f"prefill_{longest}"] / ours["weights_bytes"]
        print(f"  {row['family']:<7}{row['shape']:<6} prefill {pre}; decode {dec:.1f}x; "
              f"leanseq peak above weights at L={longest}: {peak:.2f}x the weights")


if __name__ == "__main__":
    sys.exit(main())
