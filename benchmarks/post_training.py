"""Post-training, measured: int8 quantisation (size, memory, decode latency, joules per token, bits per byte or
accuracy against float32), distillation (teacher vs student alone vs distilled student) and LoRA fine-tuning.

    python benchmarks/post_training.py                 # everything (about 15-20 minutes on a shared 2-core machine)
    python benchmarks/post_training.py --only quantize # or distill, lora
    python benchmarks/post_training.py --train-only    # train (once, cached) the 14M-parameter model int8 is timed on
    python benchmarks/post_training.py --only quantize --case trained-14m --case shakespeare   # some cases only
    python benchmarks/post_training.py --quick         # small settings, to check the script runs
    python benchmarks/post_training.py --plot-only     # redraw docs/post_training.png from the JSON files

The quantize section's trained-14m case needs a 13.6M-parameter Mamba trained on the Shakespeare corpus
(leanseq.text.trained): the first run trains it (150 steps; about 5 minutes on 2 free cores, longer on a busy
machine) and caches it under ~/.cache/leanseq/models; train it with --train-only, niced, before a timed run.

Every ratio is against a peer measured in the same run (int8 and dynamic against float32; the distilled student
against the teacher and the student trained alone on the same budget). Writes docs/post_training.json (or
--out). Not part of make test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

import leanseq
from leanseq.bench.spec import build_from_spec
from leanseq.models.commands import bundled_checkpoint
from leanseq.post import distill as distill_mod
from leanseq.post import quantize as quant_mod
from leanseq.tasks import get_task
from leanseq.text.trained import SHAKESPEARE_14M, load_or_train
from leanseq.train import TrainSection

MAMBA_130M = "mamba:hidden_size=768,num_hidden_layers=24,vocab_size=50280"


def trained_big_model(quick: bool):
    """The trained model too big for the CPU cache (leanseq.text.trained): trained on first use (minutes, with a
    progress bar) and cached under ~/.cache/leanseq/models. --quick trains a tiny stand-in for 3 steps instead."""
    recipe = SHAKESPEARE_14M
    if quick:
        recipe = dataclasses.replace(recipe, name="shakespeare-mamba-quick", hidden_size=64, steps=3,
                                     eval_batches=1, checkpoint_interval=0)
    model, record = load_or_train(recipe, threads=2)
    print(f"{recipe.name}: {record['parameters']:,} parameters, {record['steps']} steps x {recipe.batch_size} x "
          f"{recipe.seq_len} bytes ({record['tokens']:,} bytes), trained in {record['train_seconds']:.0f} s on "
          f"{record['threads']} threads; validation {record['eval_bits_per_byte']:.3f} bits/byte", flush=True)
    return model, record


# the quantisation cases: (--case name, model loader -> (model, record of its training or None), evaluation,
# thread counts). Loaders run only for the cases asked for, so `--case trained-14m` trains nothing else.
QUANTIZE_CASES = {
    "trained-14m": (trained_big_model, {"text": "corpus"}, (2, 1)),
    "shakespeare": (lambda quick: (leanseq.load(bundled_checkpoint("shakespeare-mamba")), None), {"text": "corpus"},
                    (2, 1)),
    "induction": (lambda quick: (leanseq.load(bundled_checkpoint("induction-mamba")), None),
                  {"task": "induction_heads"}, (2, 1)),
    "130m": (lambda quick: (build_from_spec(MAMBA_130M), None), {}, (2,)),
}
CASE_TITLES = {
    "trained-14m": "{name} (trained, bits/byte on the corpus validation split)",
    "shakespeare": "shakespeare-mamba (trained, bits/byte on the corpus validation split)",
    "induction": "induction-mamba (trained, induction-heads accuracy)",
    "130m": "Mamba 130m shape (random weights)",
}


def quantize_section(quick: bool, scratch: Path, cases: list[str] | None = None) -> dict:
    results = {}
    for case in cases or list(QUANTIZE_CASES):
        load, evaluation, thread_counts = QUANTIZE_CASES[case]
        model, record = load(quick)
        name = CASE_TITLES[case].format(name=record["recipe"]["name"] if record else case)
        if "task" in evaluation:
            evaluation = {"task": get_task(evaluation["task"], seq_len=256)}
        big = model.num_parameters() > 10**8  # the dynamic model's eager step takes seconds there: fewer steps
        for threads in thread_counts:
            settings = quant_mod.QuantizeSettings(
                dynamic=True, threads=threads, steps=8 if quick else 16 if big else 64, rounds=1 if quick else 3,
                eval_windows=2 if quick else 64, eval_batches=2 if quick else 32, **evaluation)
            start = time.perf_counter()
            report = quant_mod.quantize_and_report(model, scratch / "int8", settings, progress=False)
            shutil.rmtree(scratch / "int8", ignore_errors=True)
            key = f"{name}, {threads} thread{'s' if threads > 1 else ''}"
            print(f"\n## {key} ({time.perf_counter() - start:.0f} s)\n\n{quant_mod.format_report(report)}", flush=True)
            if record is not None:
                report["trained"] = record  # how long, on how much text, and how good in float32
            results[key] = report
        if len(thread_counts) > 1:
            results[f"{name}, best thread count"] = best = best_thread_counts(
                {t: results[f"{name}, {t} thread{'s' if t > 1 else ''}"] for t in thread_counts})
            print("\nbest thread count of each method: " + ", ".join(
                f"{m} {r['step_s'] * 1e3:.3f} ms ({r['threads']} thread{'s' if r['threads'] > 1 else ''}, "
                f"{r['decode_speedup']:.2f}x)" for m, r in best["rows"].items()), flush=True)
        del model
    return results


def best_thread_counts(reports: dict[int, dict]) -> dict:
    """Each method's fastest decode step over the thread counts measured (1 or 2 on a 2-core machine), and its
    speed-up over float32's fastest: what a user who picks the thread count gets."""
    methods = next(iter(reports.values()))["rows"]
    rows = {}
    for method in methods:
        threads, report = min(reports.items(), key=lambda tr: tr[1]["rows"][method]["step_s"])
        rows[method] = {"method": method, "threads": threads, "step_s": report["rows"][method]["step_s"]}
    for row in rows.values():
        row["decode_speedup"] = rows["float32"]["step_s"] / row["step_s"]
    return {"summary": "best thread count", "thread_counts": sorted(reports), "rows": rows}


def distill_section(quick: bool, scratch: Path) -> dict:
    results = {}
    task = get_task("induction_heads", seq_len=64)
    train = TrainSection(steps=20 if quick else 2000, batch_size=8, lr=3e-3, min_lr=1e-4, warmup_steps=20,
                         eval_interval=0, eval_batches=2 if quick else 16, eval_batch_size=32, weight_decay=0.1)
    settings = distill_mod.DistillSettings(temperature=2.0, kl_weight=0.7, task_weight=0.3, positions="all")
    student = {"family": "mamba", "hidden_size": 24, "num_hidden_layers": 2}
    for teacher_name in ("induction-mamba", "induction-transformer"):
        start = time.perf_counter()
        report = distill_mod.distill(leanseq.load(bundled_checkpoint(teacher_name)), student, task, train,
                                     scratch / teacher_name, settings, progress=False)
        print(f"\n## distillation, teacher {teacher_name} ({time.perf_counter() - start:.0f} s)\n\n"
              f"{distill_mod.format_report(report)}", flush=True)
        results[teacher_name] = report
    return results


def lora_section(quick: bool, scratch: Path) -> dict:
    from leanseq.post.lora import LoraSettings, finetune

    rng = random.Random(0)
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(5)) for _ in range(8)]
    text = scratch / "words"
    text.mkdir()
    for split, n in (("train", 20000), ("validation", 4000)):
        (text / f"{split}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)))
    task = get_task("bytes_lm", source=str(text), seq_len=64)
    train = TrainSection(steps=10 if quick else 100, batch_size=8, lr=1e-2, min_lr=1e-4, warmup_steps=10,
                         eval_interval=0, eval_batches=4, eval_batch_size=16, weight_decay=0.0)
    start = time.perf_counter()
    report = finetune(leanseq.load(bundled_checkpoint("shakespeare-mamba")), task, LoraSettings(r=8, alpha=16),
                      train, scratch / "lora", merge=True, progress=False)
    report["seconds"] = time.perf_counter() - start
    print(f"\n## LoRA on shakespeare-mamba, made-up words ({report['seconds']:.0f} s)\n\n"
          f"accuracy {report['before']['eval_accuracy']:.3f} -> {report['after']['eval_accuracy']:.3f}, "
          f"bits/byte {report['before']['eval_bits_per_byte']:.3f} -> {report['after']['eval_bits_per_byte']:.3f}; "
          f"{report['trainable_parameters']:,} trainable of {report['parameters']:,}", flush=True)
    return report


def plot(folder: Path) -> Path | None:
    """docs/post_training.png from the JSON files this script wrote: distillation accuracy, and the int8 /
    float32 ratios (size, memory, decode speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {}
    for name in ("post_training_train.json", "post_training_quantize.json", "post_training.json"):
        if (folder / name).is_file():
            found.update(json.loads((folder / name).read_text()))
    if "distill" not in found and "quantize" not in found:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    if "distill" in found:
        ax, width = axes[0], 0.25
        teachers = list(found["distill"])
        for i, row in enumerate(("teacher", "student alone", "student distilled")):
            values = [found["distill"][t]["rows"][row]["accuracy"] for t in teachers]
            ax.bar([x + (i - 1) * width for x in range(len(teachers))], values, width, label=row)
        ax.set_xticks(range(len(teachers)), [f"teacher: {t}" for t in teachers])
        ax.axhline(0.95 * max(found["distill"][t]["rows"]["teacher"]["accuracy"] for t in teachers), ls=":",
                   color="grey", label="95% of teacher")
        ax.set_ylabel("induction-heads accuracy")
        ax.set_title("Distillation: student with 1/5 of the teacher's parameters")
        ax.legend(fontsize=8, loc="lower right")
    if "quantize" in found:
        ax, width = axes[1], 0.2
        quantize = found["quantize"]
        cases = [k for k, v in quantize.items() if v.get("threads") == 2]
        two_threads = [quantize[c] for c in cases]
        one_thread = [quantize.get(c.replace(", 2 threads", ", 1 thread")) for c in cases]  # None: not measured
        bars = (("disk_ratio", "smaller on disk", two_threads), ("memory_ratio", "smaller in memory", two_threads),
                ("decode_speedup", "faster decode step, 2 threads", two_threads),
                ("decode_speedup", "faster decode step, 1 thread", one_thread))
        top = 0.0
        for i, (key, label, reports) in enumerate(bars):
            values = [float("nan") if r is None else r["rows"]["int8"].get(key, 0) for r in reports]
            top = max([top, *(v for v in values if not math.isnan(v))])
            ax.bar([x + (i - 1.5) * width for x in range(len(cases))], values, width, label=label,
                   hatch="//" if "1 thread" in label else None)
        ax.set_xticks(range(len(cases)), [c.split(" (")[0].replace("shakespeare-", "shakespeare-\n") for c in cases],
                      fontsize=8)
        ax.axhline(1, color="black", lw=0.8)
        ax.set_ylabel("int8 / float32 (x)")
        ax.set_title("int8 against float32, each case in one run")
        ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=8, ncol=2, loc="upper left")
    fig.tight_layout()
    out = folder / "post_training.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("quantize", "distill", "lora"), action="append")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="docs/post_training.json")
    parser.add_argument("--case", choices=list(QUANTIZE_CASES), action="append",
                        help="quantisation cases to measure (default: all); their rows replace the same rows of an "
                             "existing --out file, the others are kept")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or find cached) the trained-14m model and stop: run it niced, before a locked "
                             "measurement")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        print(f"wrote {plot(Path(args.out).parent)}")
        return 0
    if args.train_only:
        trained_big_model(args.quick)
        return 0
    sections = args.only or ["lora", "quantize", "distill"]
    results = {"torch": torch.__version__, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="leanseq-post-") as tmp:
        for name in sections:
            torch.set_num_threads(1 if name != "quantize" else torch.get_num_threads())
            extra = {"cases": args.case} if name == "quantize" else {}
            results[name] = globals()[f"{name}_section"](args.quick, Path(tmp), **extra)
    out = Path(args.out)
    if args.case and out.is_file():  # a subset of the cases: keep the other cases' rows of the earlier run
        earlier = json.loads(out.read_text())
        results["quantize"] = {**earlier.get("quantize", {}), **results["quantize"]}
        results = {**earlier, **results}
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    figure = plot(Path(args.out).parent)
    if figure is not None:
        print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
