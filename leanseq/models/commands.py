"""`leanseq generate`: load a checkpoint (or the bundled tiny one) and stream a continuation, with its speed."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path


def bundled_checkpoint(name: str = "tiny-mamba") -> Path:
    """Path of a checkpoint shipped inside the package (leanseq/data/<name>)."""
    path = Path(str(resources.files("leanseq") / "data" / name))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no bundled checkpoint {name!r} in {path.parent}")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream tokens from a checkpoint and report decode speed")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled tiny Mamba)")
    p.add_argument("--prompt", default="1 2 3 4", help="prompt token ids, space separated")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch

    import leanseq

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else bundled_checkpoint()
    try:
        ids = [int(t) for t in args.prompt.replace(",", " ").split()]
    except ValueError as exc:
        raise ValueError(f"--prompt must be space-separated integer token ids, got {args.prompt!r}") from exc
    model = leanseq.load(path)
    prompt = torch.tensor([ids], dtype=torch.long)
    print(f"model: {path} ({model.config.model_type}, {model.num_parameters():,} parameters)")
    print(f"prompt: {ids}")
    print("tokens:", end=" ", flush=True)
    t0 = time.perf_counter()
    first = None
    n = 0
    for token in model.generate_stream(prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed):
        if first is None:
            first = time.perf_counter() - t0
        n += 1
        print(int(token[0]), end=" ", flush=True)
    total = time.perf_counter() - t0
    print()
    if n:
        decode = (total - first) / max(n - 1, 1)
        print(f"prefill + first token: {first * 1e3:.1f} ms; decode: {decode * 1e3:.2f} ms/token "
              f"({1 / decode if decode > 0 else float('inf'):.0f} tokens/s)")
    return 0
