"""`leanseq demo`: a Mamba and a transformer of about the same size, both trained on Induction Heads at
length 256, read ever longer contexts (2^8 .. 2^20 tokens); per length we print accuracy, joules per token
(with the energy Meter's method label) and the memory one stream's state takes, then the headline: the
transformer / Mamba energy-per-token ratio at the longest context both completed, and how it was measured.

The bundled checkpoints (leanseq/data/induction-mamba, leanseq/data/induction-transformer) were produced by
`leanseq repro induction`, the Mamba then trained further at long lengths by
benchmarks/induction_mamba_more_training.py (see docs/repro_induction.md); `--train` trains fresh ones instead.

At each length L the models read the same held-out induction-heads sequences, exactly as the task defines
them. A recurrent model streams each sequence in chunks through `model(x, state, return_state=True)`, so its
memory stays constant; the transformer reads it in one causal pass into a KV cache sized L (its state). Joules
per token = the Meter's joules for reading those sequences / the tokens read. The transformer is skipped at
lengths whose predicted time (quadratic in L) or memory exceeds the budgets; the report says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import torch

from leanseq.bench.context import estimate_memory, is_transformer, predict_seconds, run_metadata
from leanseq.energy.machine import load_average

BUNDLED = {"mamba": "induction-mamba", "transformer": "induction-transformer"}
DEFAULT_LENGTHS = tuple(4**k for k in range(4, 11))  # 2^8, 2^10, ..., 2^20
DEFAULT_EVAL_TOKENS = 2**17  # per model and length: samples = this // L, within [1, 32]
EVAL_SEED = 2**30 + 7  # held out from every training stream


def bundled_path(which: str) -> Path:
    """Folder of a checkpoint shipped in the package: which = "mamba" | "transformer"."""
    if which not in BUNDLED:
        raise ValueError(f"no bundled demo model {which!r}; choose from {', '.join(BUNDLED)}")
    path = Path(str(resources.files("leanseq") / "data" / BUNDLED[which]))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled checkpoint {path} is missing; reinstall leanseq or run `leanseq demo --train`")
    return path


def load_bundled(which: str):
    from leanseq.models import load

    return load(bundled_path(which)).eval()


@dataclasses.dataclass
class DemoSettings:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    max_samples: int = 32
    min_samples: int = 1
    prefill_chunk: int = 4096
    time_budget: float = 120.0  # seconds per transformer length (predicted quadratically from the last one)
    memory_budget: float = 8e9  # bytes
    seed: int = EVAL_SEED

    def samples_at(self, length: int) -> int:
        return max(self.min_samples, min(self.max_samples, self.eval_tokens // length))


# ---- measuring ----------------------------------------------------------------------------------------------
@torch.no_grad()
def read_sequences(model, inputs: torch.Tensor, prefill_chunk: int, progress=None):
    """Read (B, L) sequences; return (last-position logits (B, V), bytes of one stream's state after them).

    progress(tokens) is called as tokens are read (per chunk for a recurrent model)."""
    rows, length = inputs.shape
    if is_transformer(model):
        # the first prefill into an empty cache is one plain causal pass that also fills the cache
        logits, state = model(inputs, model.init_state(rows, capacity=length), return_state=True)
        if progress is not None:
            progress(rows * length)
        return logits[:, -1], state.nbytes() // rows
    state = model.init_state(rows)
    for start in range(0, length, prefill_chunk):
        chunk = inputs[:, start:start + prefill_chunk]
        logits, state = model(chunk, state, return_state=True)
        if progress is not None:
            progress(chunk.numel())
    return logits[:, -1], state.nbytes() // rows


def transformer_skip(model, length: int, samples: int, settings: DemoSettings,
                     last: tuple[int, float] | None) -> str | None:
    """Why the transformer is not run at `length`, or None. last = (length, seconds per sequence) of the
    previous length it completed; a sequence's time is predicted quadratically in its length."""
    memory = estimate_memory(model, length, decode_steps=0)["total"]
    if memory > settings.memory_budget:
        return f"memory: ~{memory / 1e9:.3g} GB > {settings.memory_budget / 1e9:g} GB budget"
    if last is not None:
        per_sequence, basis = predict_seconds(last[0], last[1], length, 2.0)
        if per_sequence * samples > settings.time_budget:
            return (f"time: predicted {per_sequence * samples:.0f} s for {samples} sequences > "
                    f"{settings.time_budget:g} s budget (per sequence {basis})")
    return None


def run_demo(models: dict, settings: DemoSettings, meter=None, progress: bool = True) -> dict:
    """models: {"mamba": ..., "transformer": ...}. Returns a JSON-ready dict with one row per model and length."""
    from tqdm.auto import tqdm

    from leanseq.energy import Meter
    from leanseq.tasks import InductionHeadsConfig

    meter = meter or Meter()
    vocab = min(m.vocab_size for m in models.values())
    load_start = load_average()
    started = time.perf_counter()
    total = sum(settings.samples_at(n) * n for n in settings.lengths) * len(models)
    bar = tqdm(total=total, desc="demo", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr)
    rows, last_ok = [], {name: None for name in models}
    for length in settings.lengths:
        samples = settings.samples_at(length)
        task = InductionHeadsConfig(seq_len=length, vocab_size=vocab)
        inputs, targets, _ = task.generate(samples, torch.Generator().manual_seed(settings.seed + length))
        answers = targets[:, -1]
        for name, model in models.items():
            bar.set_postfix_str(f"{name} @ {length}")
            row = {"model": name, "length": length, "samples": samples}
            reason = (transformer_skip(model, length, samples, settings, last_ok[name])
                      if is_transformer(model) else None)
            if reason:
                row.update(status="skipped", reason=reason)
                bar.update(samples * length)
                rows.append(row)
                continue
            batch = max(1, min(samples, 2**15 // length))  # rows read together
            correct, state_bytes, t0 = 0, 0, time.perf_counter()
            with meter.measure(f"{name} {length}") as window:
                for start in range(0, samples, batch):
                    logits, state_bytes = read_sequences(model, inputs[start:start + batch], settings.prefill_chunk,
                                                         progress=bar.update)
                    correct += int((logits.argmax(-1) == answers[start:start + batch]).sum())
            seconds = time.perf_counter() - t0
            m = window.result
            last_ok[name] = (length, seconds / samples)
            row.update(status="ok", correct=correct, accuracy=correct / samples, state_bytes=state_bytes,
                       joules=m.energy_j, joules_per_token=m.energy_j / (samples * length), method=m.method,
                       wall_s=m.wall_s, cpu_s=m.cpu_s, peak_rss_bytes=m.peak_rss_bytes)
            rows.append(row)
    bar.close()
    results = {
        "demo": "induction heads over growing contexts",
        "models": {name: {"class": type(m).__name__, "num_parameters": m.num_parameters(),
                          "config": m.config.to_dict()} for name, m in models.items()},
        "settings": dataclasses.asdict(settings),
        "rows": rows,
        "energy": {"method": meter.method, "backend": meter.backend_name, "why": meter.backend_reason},
        "metadata": {**run_metadata(), "load_average_1m": {"start": load_start, "end": load_average()}},
        "total_wall_s": time.perf_counter() - started,
    }
    results["headline"] = headline(results)
    return results


def _ok(results: dict, name: str) -> dict[int, dict]:
    return {r["length"]: r for r in results["rows"] if r["model"] == name and r["status"] == "ok"}


def headline(results: dict) -> dict:
    """At the longest length both models completed: accuracies and the transformer / Mamba J-per-token ratio,
    with how the joules were obtained. "text" is the full sentence; "title" a short form for the plot."""
    ok_m, ok_t = _ok(results, "mamba"), _ok(results, "transformer")
    both = sorted(set(ok_m) & set(ok_t))
    if not both:
        text = "no length was completed by both models; no ratio"
        return {"length": None, "text": text, "title": text}
    n = both[-1]
    m, t = ok_m[n], ok_t[n]
    ratio = t["joules_per_token"] / m["joules_per_token"] if m["joules_per_token"] > 0 else float("inf")
    # how the joules were obtained, e.g. "estimated: process CPU-s x 6.75 W/core (default watts)"
    method = results.get("energy", {}).get("method") or m["method"]
    longest_m = max(ok_m) if ok_m else None
    text = (f"At {_exp2(n)} = {n:,} tokens (the longest context both models completed): Mamba "
            f"{m['accuracy']:.0%} accurate ({m['correct']}/{m['samples']}) vs transformer {t['accuracy']:.0%} "
            f"({t['correct']}/{t['samples']}); energy per token: transformer / Mamba = {ratio:.3g}x "
            f"({t['joules_per_token']:.3g} J vs {m['joules_per_token']:.3g} J per token, {method}).")
    if longest_m and longest_m > n:
        lm = ok_m[longest_m]
        text += (f" Mamba went on to {_exp2(longest_m)} = {longest_m:,} tokens: {lm['accuracy']:.0%} "
                 f"({lm['correct']}/{lm['samples']}), {lm['joules_per_token']:.3g} J/token, state "
                 f"{_fmt_bytes(lm['state_bytes'])}.")
    title = (f"Induction heads at {_exp2(n)} tokens: Mamba {m['accuracy']:.0%} vs transformer {t['accuracy']:.0%} "
             f"accurate; energy per token, transformer / Mamba = {ratio:.3g}x ({method})")
    return {"length": n, "mamba_accuracy": m["accuracy"], "transformer_accuracy": t["accuracy"],
            "energy_ratio": ratio, "energy_method": method, "text": text, "title": title}


# ---- output -------------------------------------------------------------------------------------------------
def _exp2(n: int) -> str:
    k = n.bit_length() - 1
    return f"2^{k}" if n == 1 << k else str(n)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def format_table(results: dict) -> str:
    """Markdown: per length and model, accuracy, joules per token and state memory."""
    lines = ["| context | model | accuracy | J / token | state (one stream) | seconds |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        head = f"| {_exp2(r['length'])} ({r['length']:,}) | {r['model']} |"
        if r["status"] != "ok":
            lines.append(f"{head} skipped: {r['reason']} | | | |")
            continue
        lines.append(f"{head} {r['accuracy']:.0%} ({r['correct']}/{r['samples']}) | {r['joules_per_token']:.3g} | "
                     f"{_fmt_bytes(r['state_bytes'])} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def format_report(results: dict, command: str | None = None, sources: dict | None = None) -> str:
    meta = results["metadata"]
    load = meta["load_average_1m"]
    lines = ["# leanseq demo: induction heads over growing contexts", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += [f"**{results['headline']['text']}**", "", format_table(results), ""]
    for name, info in results["models"].items():
        src = f" from {sources[name]}" if sources and name in sources else ""
        lines.append(f"- {name}: {info['class']}{src}, {info['num_parameters']:,} parameters, trained on induction "
                     "heads (the bundled models' training is in docs/repro_induction.md)")
    lines += [
        (f"- energy: {results['energy']['method']} ({results['energy']['why']}); J/token = the Meter's joules "
        "for reading the length's sequences / tokens read"),
        ("- accuracy: the answer at the last position of held-out induction-heads sequences of that length "
        "(correct/samples); the Mamba reads in chunks at constant memory, the transformer in one causal pass "
        "into a KV cache (its state, which grows with the context)"),
        (f"- transformer budgets: {results['settings']['time_budget']:g} s per length (predicted quadratically), "
        f"{results['settings']['memory_budget'] / 1e9:g} GB"),
        (f"- machine: {meta['machine']['cpu']}, {meta['torch_threads']} torch threads, load average "
        f"{_fmt_load(load['start'])} at start and {_fmt_load(load['end'])} at end (other work on the machine "
        "slows both models), "
        f"{results['total_wall_s']:.0f} s in all, {meta['date_utc']}"),
    ]
    return "\n".join(lines) + "\n"


def _fmt_load(value) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def plot(results: dict, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanseq.bench.repro import _save

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    # the lines often coincide (both models 100% accurate at short contexts, equal-sized curves): distinct
    # markers, open vs filled, and line styles keep each one visible where it lies under the other
    styles = [{"marker": "o", "linestyle": "-", "markersize": 9, "markerfacecolor": "none", "markeredgewidth": 1.6,
               "linewidth": 2.2},
              {"marker": "s", "linestyle": "--", "markersize": 5, "linewidth": 1.4}]
    for i, name in enumerate(results["models"]):
        ok = _ok(results, name)
        xs = sorted(ok)
        style = {**styles[i % len(styles)], "label": name, "zorder": 3 + i}
        axes[0].plot(xs, [100 * ok[x]["accuracy"] for x in xs], **style)
        axes[1].plot(xs, [ok[x]["joules_per_token"] for x in xs], **style)
        axes[2].plot(xs, [ok[x]["state_bytes"] for x in xs], **style)
    titles = ("accuracy (%)", f"joules per token ({results['energy']['backend']})", "state of one stream (bytes)")
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_xscale("log", base=2)
        if i:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-4, 106)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    head = results["headline"]
    fig.suptitle(textwrap.fill(head.get("title", head["text"]), width=120), fontsize=10)
    return _save(fig, plt, path)


def write_outputs(results: dict, out_dir: str | os.PathLike, command: str | None = None,
                  sources: dict | None = None) -> dict[str, Path]:
    import json

    from leanseq.models.checkpoint import write_file_atomic

    out = Path(out_dir)
    return {
        "report": write_file_atomic(out / "report.md", format_report(results, command, sources)),
        "json": write_file_atomic(out / "demo.json", json.dumps(results, indent=2, default=str) + "\n"),
        "plot": plot(results, out / "plot.png"),
    }


# ---- the command --------------------------------------------------------------------------------------------
def register_demo(subparsers) -> None:
    from leanseq.argtypes import positive_float, positive_int
    from leanseq.energy import add_cli_arguments

    p = subparsers.add_parser(
        "demo", help="Mamba vs transformer on induction heads as the context grows to 2^20 (accuracy, J/token, memory)",
        description="Load the bundled Mamba and transformer (both trained on induction heads at length 256), "
        "stream both over contexts 2^8 .. 2^20 and print accuracy, joules per token and state memory per length, "
        "and the headline ratio. Writes report.md and plot.png to --out.",
    )
    p.add_argument("--out", default="leanseq-out/demo", help="output folder (default leanseq-out/demo)")
    p.add_argument("--train", action="store_true", help="train both models now instead of loading the bundled ones")
    p.add_argument("--steps", type=positive_int, default=None, help="with --train: training steps (default 2000)")
    p.add_argument("--max-len", type=positive_int, default=2**20, help="longest context (default 2^20)")
    p.add_argument("--eval-tokens", type=positive_int, default=DEFAULT_EVAL_TOKENS,
                   help=f"tokens per model and length; samples = this / length in [1, 32] (default {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--time-budget", type=positive_float, default=120.0,
                   help="seconds per transformer length before it is skipped (default 120)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny lengths, for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cli_arguments(p)
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from leanseq.bench.repro_commands import command_line
    from leanseq.energy import Meter, meter_kwargs_from_args

    torch.set_num_threads(args.threads)
    settings = DemoSettings(eval_tokens=args.eval_tokens, time_budget=args.time_budget)
    max_len = args.max_len
    if args.quick:
        settings = DemoSettings(lengths=(16, 64, 256), eval_tokens=1024, max_samples=8, time_budget=args.time_budget)
        max_len = min(max_len, 256)
    settings.lengths = tuple(n for n in settings.lengths if n <= max_len) or (max_len,)
    out = Path(args.out)
    if args.train:
        models, sources = train_demo_models(out / "train", steps=args.steps, quick=args.quick,
                                            progress=not args.no_progress)
    else:
        models = {name: load_bundled(name) for name in BUNDLED}
        sources = {name: f"bundled checkpoint leanseq/data/{BUNDLED[name]}" for name in BUNDLED}
    meter = Meter(**meter_kwargs_from_args(args))
    for name, model in models.items():
        print(f"{name}: {type(model).__name__}, {model.num_parameters():,} parameters ({sources[name]})")
    print(f"contexts {', '.join(_exp2(n) for n in settings.lengths)}; torch threads {torch.get_num_threads()}; "
          f"energy {meter.method}", flush=True)
    results = run_demo(models, settings, meter=meter, progress=not args.no_progress)
    print(format_table(results))
    print()
    print(results["headline"]["text"])
    paths = write_outputs(results, out, command=command_line("leanseq demo"), sources=sources)
    print(f"wrote {paths['report']} and {paths['plot']} (all figures also in {paths['json']})")
    return 0


def train_demo_models(out_dir: Path, steps: int | None = None, quick: bool = False, progress: bool = True):
    """Train the demo's two models with the repro recipe (leanseq.bench.repro); resumes from out_dir."""
    from leanseq.bench import repro
    from leanseq.tasks import InductionHeadsConfig

    settings = repro.quick_induction_settings() if quick else repro.InductionSettings()
    models, sources = {}, {}
    for name, repro_name in (("mamba", "mamba"), ("transformer", "mha-rope")):
        training = settings.mamba if name == "mamba" else settings.transformer
        if steps:
            training = dataclasses.replace(training, steps=steps)
        model = repro.induction_model(repro_name, settings)
        task = InductionHeadsConfig(seq_len=settings.train_len, vocab_size=settings.vocab_size)
        info = repro.train(model, task, training, out_dir / name, progress=progress)
        models[name] = model
        sources[name] = f"trained now: {info['steps']} steps at length {settings.train_len}, saved in {out_dir / name / 'model'}"
    return models, sources
