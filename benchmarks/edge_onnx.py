"""onnxruntime step latency against eager PyTorch's, for the same weights, in one run.

    python benchmarks/edge_onnx.py                                   # 130m shapes, Mamba-1 and Mamba-2
    python benchmarks/edge_onnx.py --shape tiny --steps 50 --rounds 1 --out leanseq-out/edge_onnx   # smoke test

For each family a seeded random model of the shape is built and exported (leanseq.post.onnx_export: step
graph and a 64-token prefill graph). Then, for R rounds, three sides take turns (the order rotates every
round), each timing S decode steps of one stream from the state after a 64-token prompt:
  - torch+native: eager model.step with the compiled C decode kernel (leanseq's default on a CPU);
  - torch: eager model.step with the C kernels switched off (the PyTorch ops only);
  - onnxruntime: leanseq.edge's EdgeModel.step on numpy arrays (the torch-free runtime).
torch and onnxruntime use the same thread count (--threads). A 64-token prefill is timed the same way.
Medians per round, then the median over rounds; ratios are onnxruntime / eager in the same run.
Writes OUT.json, OUT.md and OUT.png (bar chart).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "130m": {
        "mamba": {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16},
        "mamba2": {"vocab_size": 50288, "hidden_size": 768, "num_hidden_layers": 24, "num_heads": 24,
                   "head_dim": 64, "state_size": 128, "n_groups": 1, "tie_word_embeddings": True},
    },
    "tiny": {
        "mamba": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16},
        "mamba2": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4, "head_dim": 32,
                   "state_size": 16, "n_groups": 1},
    },
}
PROMPT = 64
SIDES = ("torch+native", "torch", "onnxruntime")


def build(family: str, shape: str):
    torch.manual_seed(0)
    if family == "mamba":
        from leanseq.models.mamba import MambaConfig, MambaLM

        return MambaLM(MambaConfig(**SHAPES[shape][family])).eval()
    from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

    return Mamba2LM(Mamba2Config(**SHAPES[shape][family])).eval()


def set_native(on: bool) -> None:
    from leanseq.ops import decode, native

    native.set_enabled(on)
    decode.set_enabled(on)


def time_torch(model, prompt: np.ndarray, steps: int, native_on: bool) -> tuple[float, float]:
    """(median seconds per decode step, seconds for the 64-token prefill)."""
    set_native(native_on)
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, state = model(ids, state=model.init_state(1), return_state=True, logits="last")
        prefill = time.perf_counter() - t0
        token = logits[:, -1].argmax(-1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits, state = model.step(token, state)
            times.append(time.perf_counter() - t0)
            token = logits.argmax(-1)
    set_native(None)
    return statistics.median(times), prefill


def time_onnx(edge, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    logits, state = edge.prefill(prompt, edge.init_state(1), check=False)
    prefill = time.perf_counter() - t0
    token = logits.argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, state = edge.step(token, state, check=False)
        times.append(time.perf_counter() - t0)
        token = logits.argmax(-1)
    return statistics.median(times), prefill


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="130m")
    p.add_argument("--families", default="mamba,mamba2")
    p.add_argument("--steps", type=int, default=200, help="decode steps timed per side and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/edge_onnx")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from leanseq.edge import EdgeModel
    from leanseq.post.onnx_export import export_onnx

    torch.set_num_threads(args.threads)
    # numpy notes, once onnxruntime has set flush-to-zero, that float32's smallest subnormal reads as zero
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    families = [f for f in args.families.split(",") if f]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            model = build(family, args.shape)
            t0 = time.perf_counter()
            manifest = export_onnx(model, Path(tmp) / family, prefill_chunk=PROMPT, progress=False)
            export_s = time.perf_counter() - t0
            edge = EdgeModel(Path(tmp) / family, threads=args.threads)
            prompt = np.random.default_rng(0).integers(0, model.vocab_size, size=(1, PROMPT))
            per_round = {s: {"step": [], "prefill": []} for s in SIDES}
            for r in tqdm(range(args.rounds), desc=f"{family} {args.shape}", file=sys.stderr):
                order = SIDES[r % 3:] + SIDES[:r % 3]
                for side in order:
                    if side == "onnxruntime":
                        step, prefill = time_onnx(edge, prompt, args.steps)
                    else:
                        step, prefill = time_torch(model, prompt, args.steps, native_on=side == "torch+native")
                    per_round[side]["step"].append(step)
                    per_round[side]["prefill"].append(prefill)
            med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in per_round.items()}
            results[family] = {
                "params": model.num_parameters(),
                "export_seconds": round(export_s, 1),
                "onnx_bytes": {n: (Path(tmp) / family / n).stat().st_size for n in manifest["files"]},
                "export_check_max_abs_logit_diff": manifest["check"]["max_abs_logit_diff"],
                "step_ms": {s: 1e3 * m["step"] for s, m in med.items()},
                "prefill64_ms": {s: 1e3 * m["prefill"] for s, m in med.items()},
                "step_ms_rounds": {s: [1e3 * v for v in d["step"]] for s, d in per_round.items()},
                "ratio_onnx_over_torch_native": med["onnxruntime"]["step"] / med["torch+native"]["step"],
                "ratio_onnx_over_torch": med["onnxruntime"]["step"] / med["torch"]["step"],
                "prefill_ratio_onnx_over_torch_native": med["onnxruntime"]["prefill"] / med["torch+native"]["prefill"],
            }
    report = {"started": started, "argv": sys.argv[1:] if argv is None else argv, "shape": args.shape,
              "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "onnxruntime": __import__("onnxruntime").__version__, "cpu": platform.processor(),
                          "cores": __import__("os").cpu_count()},
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    title = (f"# onnxruntime vs eager PyTorch, {args.shape} shape, {args.threads} thread(s), "
             f"{args.rounds} rounds x {args.steps} steps")
    header = ("| family | params | torch+native step ms | torch step ms | onnxruntime step ms | ort / torch+native "
              "| ort / torch | prefill 64 ms (native / torch / ort) |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|---|"]
    for family, r in results.items():
        s, pf = r["step_ms"], r["prefill64_ms"]
        lines.append(f"| {family} | {r['params'] / 1e6:.1f}M | {s['torch+native']:.2f} | {s['torch']:.2f} | "
                     f"{s['onnxruntime']:.2f} | {r['ratio_onnx_over_torch_native']:.2f} | "
                     f"{r['ratio_onnx_over_torch']:.2f} | {pf['torch+native']:.0f} / {pf['torch']:.0f} / "
                     f"{pf['onnxruntime']:.0f} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.25
        for i, side in enumerate(SIDES):
            xs = [j + (i - 1) * width for j in range(len(results))]
            ax.bar(xs, [r["step_ms"][side] for r in results.values()], width, label=side)
        ax.set_xticks(range(len(results)), [f"{f} {args.shape}" for f in results])
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title(f"one stream, {args.threads} thread(s), same weights")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
