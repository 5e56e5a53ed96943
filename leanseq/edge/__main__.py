"""python -m leanseq.edge FOLDER --prompt TEXT: generate from an exported model, without PyTorch."""

from __future__ import annotations

import argparse
import sys
import time

from leanseq.edge import EdgeModel, EdgeModelError, EdgeSession, EdgeStateError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m leanseq.edge", description=__doc__)
    p.add_argument("folder", help="a folder written by `leanseq export --format onnx`")
    p.add_argument("--prompt", default="", help="text to continue (needs the exported tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--state-in", help="continue the stream saved in this file")
    p.add_argument("--state-out", help="save the stream's state here afterwards (atomic)")
    args = p.parse_args(argv)
    try:
        model = EdgeModel(args.folder, threads=args.threads)
        session = EdgeSession.load(model, args.state_in) if args.state_in else EdgeSession(model)
        t0 = time.perf_counter()
        print(args.prompt, end="", flush=True)
        for piece in session.stream_text(args.prompt, args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, seed=args.seed):
            print(piece, end="", flush=True)
        dt = time.perf_counter() - t0
        print(flush=True)
        print(f"[edge] {session.position} tokens in the stream; generated in {dt:.2f} s", file=sys.stderr)
        if args.state_out:
            session.save(args.state_out)
            print(f"[edge] state saved to {args.state_out}", file=sys.stderr)
    except (EdgeModelError, EdgeStateError, ValueError, TypeError, OSError) as exc:
        print(f"python -m leanseq.edge: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
