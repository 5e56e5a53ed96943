"""Train leanseq's bundled induction-heads Mamba further, for length generalisation up to 2^20 tokens.

The bundled checkpoint (leanseq/data/induction-mamba) came from `leanseq repro induction` (docs/repro_induction.md).
This script continues it with the same training code (leanseq.bench.repro.train -> leanseq.train.Trainer: Adam
without weight decay, fresh batches every step, constant lr after warm-up, resumable) in extra stages, then
measures induction-heads accuracy on held-out sequences at 2^6 .. 2^20 tokens.

    # continue the bundled model: 2000 steps of batch 8 at length 256 (lr 1e-3), then evaluate
    .venv/bin/python benchmarks/induction_mamba_more_training.py --stages 256x8:2000@1e-3 --out leanseq-out/mamba-more
    # evaluate a saved model only (accuracy per length; --seed-set repro uses the repro table's held-out seeds)
    .venv/bin/python benchmarks/induction_mamba_more_training.py --eval-only leanseq-out/mamba-more/final

Each stage trains in <out>/stage<i>-len<L>/ (a rerun resumes there); the model after the last stage is saved to
<out>/final. --save-bundled overwrites leanseq/data/induction-mamba with it (do that only after checking it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

# held-out sequence seeds (+ length): used for choosing a checkpoint; distinct from every training stream, from
# the repro table's (repro.EVAL_SEED) and from the demo's (demo.EVAL_SEED), which report the final numbers
SELECT_SEED = 2**29 + 11
# (length, samples): enough sequences per length to see a failure, cheap enough to run between stages
DEFAULT_EVAL = ((2**6, 256), (2**7, 256), (2**8, 256), (2**9, 64), (2**10, 32), (2**11, 16), (2**12, 8),
                (2**13, 8), (2**14, 4), (2**15, 4), (2**16, 4), (2**17, 4), (2**18, 4), (2**19, 2), (2**20, 2))


def parse_stages(text: str) -> list[tuple[int, int, int, float]]:
    """'256x8:2000@1e-3,1024x4:500@1e-3' -> [(256, 8, 2000, 1e-3), (1024, 4, 500, 1e-3)]."""
    stages = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            shape_steps, lr = item.split("@")
            shape, steps = shape_steps.split(":")
            length, batch = shape.lower().split("x")
            stage = (int(length), int(batch), int(steps), float(lr))
        except ValueError:
            raise argparse.ArgumentTypeError(f"stage {item!r} is not LENxBATCH:STEPS@LR, e.g. 256x8:2000@1e-3") from None
        if min(stage) <= 0:
            raise argparse.ArgumentTypeError(f"stage {item!r}: every number must be positive")
        stages.append(stage)
    if not stages:
        raise argparse.ArgumentTypeError("no stages given")
    return stages


def parse_eval(text: str) -> tuple[tuple[int, int], ...]:
    """'256:128,1048576:2' -> ((256, 128), (1048576, 2)): length:samples."""
    try:
        return tuple((int(a), int(b)) for a, b in (item.split(":") for item in text.split(",") if item.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eval {text!r} is not LENGTH:SAMPLES,...") from None


def evaluate(model, lengths: tuple[tuple[int, int], ...], seed: int, log=print) -> dict[int, tuple[int, int]]:
    """{length: (correct, samples)} on held-out induction-heads sequences (answer at the last position)."""
    from leanseq.bench.repro import induction_accuracy
    from leanseq.tasks import InductionHeadsConfig

    model.eval()
    results = {}
    for length, samples in lengths:
        task = InductionHeadsConfig(seq_len=length, vocab_size=model.vocab_size)
        t0 = time.perf_counter()
        rows = max(1, min(samples, 2**15 // length))
        results[length] = induction_accuracy(model, task, samples, rows, seed + length)
        correct, n = results[length]
        log(f"  2^{length.bit_length() - 1}: {correct}/{n} = {100 * correct / n:.1f}%  ({time.perf_counter() - t0:.1f} s)",
            flush=True)
    return results


def train_stage(model, task, training, out_dir: Path) -> dict:
    """repro's training stage (leanseq.train.Trainer, resumable from out_dir) with a held-out check at the end
    sized to the length (2^15 tokens, not repro's 64 sequences, which at 2^16 tokens would cost minutes)."""
    from leanseq.bench.repro import mamba_scan_chunk
    from leanseq.train import OutputSection, Trainer

    section = dataclasses.replace(training.section(), eval_batch_size=max(1, 2**15 // task.seq_len), eval_batches=1)
    output = OutputSection(dir=str(out_dir), checkpoint_interval=training.checkpoint_interval, resume=True,
                           save_model=True, progress=False)
    torch.manual_seed(training.seed)
    trainer = Trainer(model, task, section, output)
    resumed = trainer.load_checkpoint() if trainer.checkpoint_path.exists() else 0
    started = time.perf_counter()
    with mamba_scan_chunk(training.scan_chunk_size):
        summary = trainer.fit()
    model.eval()
    return {"final_loss": summary["loss"], "train_s": time.perf_counter() - started, "resumed_from": resumed,
            "eval_accuracy_at_train_len": summary.get("eval_accuracy")}


def main(argv=None) -> int:
    from leanseq.bench import demo, repro
    from leanseq.models import load
    from leanseq.tasks import InductionHeadsConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=parse_stages, help="LENxBATCH:STEPS@LR,... trained in order")
    p.add_argument("--init", default="bundled", help="'bundled' (leanseq/data/induction-mamba) or a model folder")
    p.add_argument("--out", default="leanseq-out/induction-mamba-more")
    p.add_argument("--seed", type=int, default=1, help="training streams' seed (the bundled model used 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval", type=parse_eval, default=DEFAULT_EVAL, help="LENGTH:SAMPLES,... after training")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--seed-set", choices=("select", "repro", "demo"), default="select",
                   help="held-out sequences: this script's (select), the repro table's or the demo's seeds")
    p.add_argument("--eval-only", default=None, help="evaluate this model folder; no training")
    p.add_argument("--save-bundled", action="store_true", help="save the final model over leanseq/data/induction-mamba")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed = {"select": SELECT_SEED, "repro": repro.EVAL_SEED, "demo": demo.EVAL_SEED}[args.seed_set]

    if args.eval_only:
        model = load(args.eval_only)
        print(f"{args.eval_only}: {args.seed_set} held-out seeds", flush=True)
        results = evaluate(model, args.eval, seed)
        print(json.dumps({str(k): list(v) for k, v in results.items()}))
        return 0
    if not args.stages:
        p.error("give --stages (or --eval-only)")

    model = demo.load_bundled("mamba") if args.init == "bundled" else load(args.init)
    out = Path(args.out)
    base = repro.InductionSettings().mamba  # warm-up, grad clip, scan chunk: as the repro trained it
    for i, (length, batch, steps, lr) in enumerate(args.stages):
        training = dataclasses.replace(base, steps=steps, batch_size=batch, lr=lr, seed=args.seed + i, curriculum=())
        task = InductionHeadsConfig(seq_len=length, vocab_size=model.vocab_size)
        print(f"stage {i}: {steps} steps x batch {batch} at length {length}, lr {lr:g}", flush=True)
        info = train_stage(model, task, training, out / f"stage{i}-len{length}")
        print(f"  final loss {info['final_loss']:.4g}, accuracy at {length} {info['eval_accuracy_at_train_len']}, "
              f"{info['train_s']:.0f} s (resumed from step {info['resumed_from']})", flush=True)
    model.save_pretrained(out / "final")
    if args.save_bundled:
        model.save_pretrained(demo.bundled_path("mamba"))
        print(f"saved over {demo.bundled_path('mamba')}")
    if not args.no_eval:
        results = evaluate(model, args.eval, seed)
        print(json.dumps({str(k): list(v) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
