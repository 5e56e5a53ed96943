"""Reproductions of the Mamba paper's synthetic results (Gu & Dao 2023, arXiv 2312.00752, section 4.1).

    leanseq repro induction        # Table 11 / Table 2: train at 2^8, test at 2^6 .. 2^20
    leanseq repro selective-copy   # Table 1: the LTI (S4-like) layer vs the selective (S6) layer

    from leanseq.bench.repro import InductionSettings, run_induction, format_induction_table
    results = run_induction(InductionSettings(), out_dir="leanseq-out/repro/induction")

Training goes through leanseq.train.Trainer (fresh batches each step, resumable checkpoints under
<out>/train/<model>/), so a rerun with more steps continues where the last one stopped. Evaluation draws
held-out sequences from a seed that no training stream uses. A recurrent model reads long sequences in chunks
through `model(x, state, return_state=True)` (constant memory; only the last position's logits are kept); a
transformer reads each sequence in one causal forward pass and is skipped at lengths whose estimated memory
or time exceeds the budgets (the estimates are leanseq.bench.context's), and the table says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from leanseq.bench.context import estimate_memory, is_transformer, predict_seconds, run_metadata
from leanseq.energy.machine import load_average
from leanseq.fileio import save_figure_atomic
from leanseq.models.checkpoint import write_file_atomic

# ---- the published numbers ----------------------------------------------------------------------------------
# Mamba paper, Table 11 (Table 2 plots the same): induction-heads accuracy (%) by test length, trained at 2^8.
# Lengths the paper does not list for a model are absent (transformers: out of memory beyond 2^14).
PAPER_INDUCTION = {
    "MHA-Abs": {"params": "137K", "acc": dict(zip(range(9, 15), (58.6, 26.6, 18.8, 9.8, 10.9, 7.8)))},
    "MHA-RoPE": {"params": "137K", "acc": dict(zip(range(9, 15), (83.6, 31.3, 18.4, 8.6, 9.0, 5.5)))},
    "MHA-xPos": {"params": "137K", "acc": dict(zip(range(9, 15), (99.6, 67.6, 25.4, 7.0, 9.0, 7.8)))},
    "H3": {"params": "153K", "acc": dict(zip(range(9, 15), (80.9, 39.5, 23.8, 14.8, 8.2, 5.9)))},
    "Hyena": {"params": "69M", "acc": dict(zip(range(9, 15), (100.0, 44.1, 12.5, 6.6, 5.1, 7.0)))},
    "Mamba": {"params": "74K", "acc": {k: 100.0 for k in range(9, 21)}},  # "100 up to 2^20"
}
PAPER_INDUCTION_SOURCE = "Mamba paper (Gu & Dao 2023, arXiv 2312.00752), Table 11 (plotted in Table 2)"
# Our models and the paper row each one reproduces.
INDUCTION_PAPER_ROW = {"mamba": "Mamba", "mha-abs": "MHA-Abs", "mha-rope": "MHA-RoPE"}

# Mamba paper, Table 1: Selective Copying accuracy (%), architecture / inner layer.
PAPER_SELECTIVE_COPY = {
    "No gate / S4": 18.3, "No gate / S6": 97.0, "H3 / S4": 57.0, "H3 / Hyena": 30.1, "H3 / S6": 99.7,
    "Mamba / S4": 56.4, "Mamba / Hyena": 28.4, "Mamba / S6": 99.8,
}
PAPER_SELECTIVE_COPY_SOURCE = "Mamba paper (Gu & Dao 2023, arXiv 2312.00752), Table 1"
# Our Mamba block with the LTI layer is the paper's "Mamba / S4" row; with the selective layer, "Mamba / S6".
SELECTIVE_COPY_PAPER_ROW = {"lti": "Mamba / S4", "selective": "Mamba / S6"}

EVAL_SEED = 2**31 - 1  # held-out sequences: no training stream (seed + small offsets) reaches this


# ---- settings -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingSettings:
    """How each model is trained: Adam without weight decay, fresh batches each step (the paper's recipe)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_interval: int = 100  # so an interrupted run resumes close to where it stopped
    scan_chunk_size: int = 16  # Mamba's training scan chunk: shorter prefix scans are faster on a CPU
    # (seq_len, batch_size, steps) stages trained before the main stage, shortest first. A short sequence
    # carries one answer like a long one, so short stages give many more answers per second of CPU.
    curriculum: tuple[tuple[int, int, int], ...] = ()

    def section(self, steps: int | None = None, lr: float | None = None):
        from leanseq.train import TrainSection

        lr = self.lr if lr is None else lr
        return TrainSection(
            steps=steps or self.steps, batch_size=self.batch_size, lr=lr, min_lr=lr,  # constant after warm-up
            warmup_steps=self.warmup_steps, weight_decay=0.0, beta1=0.9, beta2=0.999,  # Adam, no decay
            grad_clip=self.grad_clip, eval_interval=0, eval_batches=2, eval_batch_size=32,
            log_interval=10, seed=self.seed, device="cpu",
        )


@dataclasses.dataclass
class InductionSettings:
    train_len: int = 256  # 2^8, as in the paper
    vocab_size: int = 16
    d_model: int = 64
    mamba: TrainingSettings = dataclasses.field(default_factory=lambda: TrainingSettings(steps=2000, lr=3e-3))
    transformer: TrainingSettings = dataclasses.field(default_factory=lambda: TrainingSettings(steps=2000, lr=1e-3))
    models: tuple[str, ...] = ("mamba", "mha-abs", "mha-rope")
    test_lengths: tuple[int, ...] = tuple(2**k for k in range(6, 21))
    eval_tokens: int = 2**16  # per model and length: samples = eval_tokens // length, clamped below
    max_samples: int = 256
    min_samples: int = 2
    eval_batch_tokens: int = 2**15  # rows per evaluation batch = max(1, this // length)
    prefill_chunk: int = 4096  # tokens per chunk of a recurrent model's prefill
    absolute_max_position: int = 2**14  # the absolute-position table's size (rows >= train_len never train)
    memory_budget: float = 8e9  # bytes, per transformer evaluation batch
    time_budget: float = 120.0  # seconds per transformer and length (attention's cost is quadratic)
    seed: int = 0

    def samples_at(self, length: int) -> int:
        return max(self.min_samples, min(self.max_samples, self.eval_tokens // length))


@dataclasses.dataclass
class SelectiveCopySettings:
    seq_len: int = 256  # context length (paper: 4096)
    num_tokens_to_copy: int = 16  # as in the paper
    vocab_size: int = 16  # as in the paper
    d_model: int = 64
    train: TrainingSettings = dataclasses.field(default_factory=lambda: TrainingSettings(steps=2000, lr=3e-3))
    models: tuple[str, ...] = ("lti", "selective")
    eval_samples: int = 512
    seed: int = 0


def quick_induction_settings() -> InductionSettings:
    """Seconds, not minutes: for tests and a first look (the numbers mean nothing)."""
    tiny = TrainingSettings(steps=3, batch_size=2, checkpoint_interval=0)
    return InductionSettings(
        train_len=32, mamba=tiny, transformer=dataclasses.replace(tiny), test_lengths=(16, 32, 64, 128),
        eval_tokens=256, max_samples=8, min_samples=2, absolute_max_position=64, time_budget=30.0,
    )


def quick_selective_copy_settings() -> SelectiveCopySettings:
    tiny = TrainingSettings(steps=3, batch_size=2, checkpoint_interval=0)
    return SelectiveCopySettings(seq_len=32, num_tokens_to_copy=4, train=tiny, eval_samples=8)


# ---- models -------------------------------------------------------------------------------------------------
def induction_model(name: str, settings: InductionSettings):
    """A freshly initialised model for the induction-heads comparison (seeded by settings.seed)."""
    from leanseq.models.mamba import MambaConfig, MambaLM
    from leanseq.models.transformer import TransformerConfig, TransformerLM

    torch.manual_seed(settings.seed)
    V, D = settings.vocab_size, settings.d_model
    if name == "mamba":
        return MambaLM(MambaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, state_size=16, expand=2))
    if name in ("mha-abs", "mha-rope"):
        # 8 heads as in the paper; width and MLP chosen so the count (tied embeddings) is near the Mamba's
        absolute = name == "mha-abs"
        return TransformerLM(TransformerConfig(
            vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            tie_word_embeddings=True, position_embedding="absolute" if absolute else "rope",
            max_position_embeddings=settings.absolute_max_position if absolute else 2**20,
        ))
    raise ValueError(f"unknown induction model {name!r}; choose from mamba, mha-abs, mha-rope")


def selective_copy_model(name: str, settings: SelectiveCopySettings):
    from leanseq.models.mamba import MambaConfig, MambaLM

    if name not in SELECTIVE_COPY_PAPER_ROW:
        raise ValueError(f"unknown selective-copy model {name!r}; choose from {', '.join(SELECTIVE_COPY_PAPER_ROW)}")
    torch.manual_seed(settings.seed)
    return MambaLM(MambaConfig(vocab_size=settings.vocab_size, hidden_size=settings.d_model, num_hidden_layers=2,
                               state_size=16, expand=2, selective=name == "selective"))


def trained_parameters(model, train_len: int) -> int:
    """Parameters that training can change: an absolute-position table's rows past train_len never get a
    gradient, so they are not counted (they stay at their initial values)."""
    total = model.num_parameters()
    table = getattr(getattr(model, "model", None), "embed_positions", None)
    if table is not None:
        total -= max(0, table.num_embeddings - train_len) * table.embedding_dim
    return total


@contextlib.contextmanager
def mamba_scan_chunk(size: int):
    """Set leanseq.models.mamba.SCAN_CHUNK_SIZE for the duration (it is module state, so restore it)."""
    from leanseq.models import mamba

    old = mamba.SCAN_CHUNK_SIZE
    mamba.SCAN_CHUNK_SIZE = size
    try:
        yield
    finally:
        mamba.SCAN_CHUNK_SIZE = old


# ---- training -----------------------------------------------------------------------------------------------
def train(model, task, training: TrainingSettings, out_dir: Path, progress: bool = True) -> dict:
    """Train `model` on `task` with the Trainer, resuming from out_dir/checkpoint.pt when it is there.

    The curriculum stages (if any) run first, each in out_dir/stage<i>-len<L> on the same task at length L.
    Returns {"steps", "final_loss", "train_s", "resumed_from", "curriculum"}; the model is saved in out_dir/model.
    """
    stages = []
    for i, (seq_len, batch_size, steps) in enumerate(training.curriculum):
        stage = dataclasses.replace(training, batch_size=batch_size, steps=steps, curriculum=())
        info = _train_stage(model, dataclasses.replace(task, seq_len=seq_len), stage,
                            out_dir / f"stage{i}-len{seq_len}", progress)
        stages.append({"seq_len": seq_len, "batch_size": batch_size, **info})
    info = _train_stage(model, task, training, out_dir, progress)
    info["curriculum"] = stages
    info["train_s"] += sum(stage["train_s"] for stage in stages)
    return info


def _train_stage(model, task, training: TrainingSettings, out_dir: Path, progress: bool) -> dict:
    from leanseq.train import OutputSection, Trainer

    output = OutputSection(dir=str(out_dir), checkpoint_interval=training.checkpoint_interval, resume=True,
                           save_model=True, progress=progress)
    torch.manual_seed(training.seed)
    trainer = Trainer(model, task, training.section(), output)
    resumed = trainer.load_checkpoint() if trainer.checkpoint_path.exists() else 0
    started = time.perf_counter()
    with mamba_scan_chunk(training.scan_chunk_size):
        summary = trainer.fit()
    model.eval()
    return {"steps": summary["step"], "final_loss": summary["loss"], "train_s": time.perf_counter() - started,
            "resumed_from": resumed, "eval_accuracy_at_train_len": summary.get("eval_accuracy")}


# ---- evaluation ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def last_logits(model, inputs: torch.Tensor, prefill_chunk: int = 4096) -> torch.Tensor:
    """Logits at the last position of each row, (B, V). A recurrent model reads in chunks (constant memory)."""
    if is_transformer(model) or inputs.shape[1] <= prefill_chunk:
        return model(inputs)[:, -1]
    state = model.init_state(inputs.shape[0])
    logits = None
    for start in range(0, inputs.shape[1], prefill_chunk):
        logits, state = model(inputs[:, start:start + prefill_chunk], state, return_state=True)
    return logits[:, -1]


def induction_accuracy(model, task, samples: int, batch_rows: int, seed: int, prefill_chunk: int = 4096,
                       progress=None) -> tuple[int, int]:
    """(correct, total) on `samples` fresh induction-heads sequences (answer at the last position)."""
    generator = torch.Generator().manual_seed(seed)
    correct = done = 0
    while done < samples:
        rows = min(batch_rows, samples - done)
        inputs, targets, _ = task.generate(rows, generator)
        prediction = last_logits(model, inputs, prefill_chunk).argmax(-1)
        correct += int((prediction == targets[:, -1]).sum())
        done += rows
        if progress is not None:
            progress(rows)
    return correct, done


def transformer_skip_reason(model, length: int, rows: int, settings: InductionSettings,
                            history: list[tuple[int, float]]) -> str | None:
    """Why a transformer is not evaluated at `length`, or None: position table, memory and time budgets."""
    cfg = model.config
    if cfg.position_embedding == "absolute" and length > cfg.max_position_embeddings:
        return f"no position embedding past {cfg.max_position_embeddings}"
    memory = estimate_memory(model, length, decode_steps=0)["total"] * rows
    if memory > settings.memory_budget:
        return f"memory: needs ~{memory / 1e9:.3g} GB > {settings.memory_budget / 1e9:.3g} GB budget"
    if history:  # (length, seconds per sequence) of the lengths done; attention's cost is quadratic
        last_length, last_seconds = history[-1]
        per_sequence, basis = predict_seconds(last_length, last_seconds, length, 2.0)
        samples = settings.samples_at(length)
        if per_sequence * samples > settings.time_budget:
            return (f"time: predicted {per_sequence * samples:.0f} s for {samples} sequences > "
                    f"{settings.time_budget:g} s budget (per sequence {basis})")
    return None


def run_induction(settings: InductionSettings, out_dir: str | os.PathLike, progress: bool = True,
                  log=print) -> dict:
    """Train each model at settings.train_len, then measure accuracy at every test length. A JSON-ready dict."""
    from tqdm.auto import tqdm

    from leanseq.tasks import InductionHeadsConfig

    out = Path(out_dir)
    started = time.perf_counter()
    results = {"experiment": "induction_heads", "settings": dataclasses.asdict(settings), "models": {},
               "paper": {"source": PAPER_INDUCTION_SOURCE, "rows": PAPER_INDUCTION}}
    trained = {}
    for name in settings.models:
        model = induction_model(name, settings)
        training = settings.mamba if name == "mamba" else settings.transformer
        log(f"[{name}] training at length {settings.train_len}: {training.steps} steps of batch "
            f"{training.batch_size}, lr {training.lr:g} (Adam, no weight decay)")
        task = InductionHeadsConfig(seq_len=settings.train_len, vocab_size=settings.vocab_size)
        info = train(model, task, training, out / "train" / name, progress=progress)
        trained[name] = model
        results["models"][name] = {
            "class": type(model).__name__, "config": model.config.to_dict(), "paper_row": INDUCTION_PAPER_ROW[name],
            "num_parameters": model.num_parameters(),
            "trained_parameters": trained_parameters(model, settings.train_len),
            "training": info, "accuracy": {},
        }

    total = sum(settings.samples_at(n) * n for n in settings.test_lengths) * len(trained)
    bar = tqdm(total=total, desc="induction eval", unit="tok", unit_scale=True, disable=not progress)
    for name, model in trained.items():
        history: list[tuple[int, float]] = []
        for length in settings.test_lengths:
            samples = settings.samples_at(length)
            rows = max(1, min(samples, settings.eval_batch_tokens // length))
            bar.set_postfix_str(f"{name} @ {length}")
            entry = {"length": length, "samples": samples}
            reason = None
            if is_transformer(model):
                reason = transformer_skip_reason(model, length, rows, settings, history)
            if reason:
                entry.update(status="skipped", reason=reason)
                bar.update(samples * length)
            else:
                task = InductionHeadsConfig(seq_len=length, vocab_size=settings.vocab_size)
                t0 = time.perf_counter()
                correct, n = induction_accuracy(model, task, samples, rows, EVAL_SEED + length,
                                                settings.prefill_chunk, progress=lambda r, n=length: bar.update(r * n))
                seconds = time.perf_counter() - t0
                history.append((length, seconds / n))
                entry.update(status="ok", correct=correct, accuracy=correct / n, seconds=seconds)
            results["models"][name]["accuracy"][str(length)] = entry
    bar.close()
    results["metadata"] = {**run_metadata(), "load_average_1m": load_average()}
    results["total_wall_s"] = time.perf_counter() - started
    return results


# ---- selective copying --------------------------------------------------------------------------------------
@torch.inference_mode()
def selective_copy_accuracy(model, task, samples: int, seed: int, batch_rows: int = 64) -> float:
    """Per-token accuracy on the answer positions of `samples` fresh sequences."""
    from leanseq.tasks import accuracy

    generator = torch.Generator().manual_seed(seed)
    correct = count = 0.0
    done = 0
    while done < samples:
        rows = min(batch_rows, samples - done)
        inputs, targets, mask = task.generate(rows, generator)
        n = int(mask.sum())
        correct += accuracy(model(inputs), targets, mask) * n
        count += n
        done += rows
    return correct / count


def run_selective_copy(settings: SelectiveCopySettings, out_dir: str | os.PathLike, progress: bool = True,
                       log=print) -> dict:
    from leanseq.tasks import SelectiveCopyingConfig

    out = Path(out_dir)
    started = time.perf_counter()
    task = SelectiveCopyingConfig(seq_len=settings.seq_len, vocab_size=settings.vocab_size,
                                  num_tokens_to_copy=settings.num_tokens_to_copy)
    results = {"experiment": "selective_copying", "settings": dataclasses.asdict(settings), "models": {},
               "paper": {"source": PAPER_SELECTIVE_COPY_SOURCE, "rows": PAPER_SELECTIVE_COPY}}
    for name in settings.models:
        model = selective_copy_model(name, settings)
        log(f"[{name}] training on selective copying (context {settings.seq_len}, "
            f"{settings.num_tokens_to_copy} tokens): {settings.train.steps} steps of batch {settings.train.batch_size}")
        info = train(model, task, settings.train, out / "train" / name, progress=progress)
        acc = selective_copy_accuracy(model, task, settings.eval_samples, EVAL_SEED)
        log(f"[{name}] accuracy {acc:.1%}")
        results["models"][name] = {
            "class": type(model).__name__, "config": model.config.to_dict(),
            "paper_row": SELECTIVE_COPY_PAPER_ROW[name], "num_parameters": model.num_parameters(),
            "training": info, "accuracy": acc, "eval_samples": settings.eval_samples,
        }
    results["metadata"] = {**run_metadata(), "load_average_1m": load_average()}
    results["total_wall_s"] = time.perf_counter() - started
    return results


# ---- tables and plots ---------------------------------------------------------------------------------------
def _exp2(n: int) -> str:
    k = round(math.log2(n))
    return f"2^{k}" if 2**k == n else str(n)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_induction_table(results: dict) -> str:
    """Markdown: for each model, our accuracy (%) per test length beside the paper's row, plus notes."""
    s = results["settings"]
    lengths = [int(n) for n in s["test_lengths"]]
    head = "| model | source | params | " + " | ".join(_exp2(n) for n in lengths) + " |"
    lines = [
        f"## Induction Heads: accuracy (%) by test length, trained at {_exp2(s['train_len'])}",
        "",
        head,
        "|" + "---|" * (3 + len(lengths)),
    ]
    notes = {}
    for name, info in results["models"].items():
        paper_name = info["paper_row"]
        paper = PAPER_INDUCTION[paper_name]
        cells = []
        for n in lengths:
            k = round(math.log2(n))
            value = paper["acc"].get(k) if 2**k == n else None
            if value is None and k <= 8 and 2**k == n:
                value = None  # the paper lists test lengths from 2^9
            cells.append("-" if value is None else f"{value:g}")
        lines.append(f"| {paper_name} | paper | {paper['params']} | " + " | ".join(cells) + " |")
        ours = []
        for n in lengths:
            entry = info["accuracy"].get(str(n))
            if entry is None:
                ours.append("")
            elif entry["status"] == "ok":
                ours.append(_pct(entry["accuracy"]))
            else:
                mark = notes.setdefault(entry["reason"].split(":")[0], len(notes) + 1)
                ours.append(f"skip[{mark}]")
        params = f"{info['trained_parameters'] / 1e3:.1f}K"
        lines.append(f"| {paper_name} | **leanseq** | {params} | " + " | ".join(ours) + " |")
    lines.append("")
    lines.append(f"Paper figures: {PAPER_INDUCTION_SOURCE}; the paper lists test lengths 2^9 .. 2^20 "
                 "(\"-\": not reported; transformers ran out of memory beyond 2^14, Mamba is 100 up to 2^20).")
    samples = ", ".join(f"{_exp2(n)}: {_samples(results, n)}" for n in lengths)
    lines.append(f"leanseq rows: held-out sequences per length ({samples}).")
    for name, info in results["models"].items():
        t, tr = info["training"], s["mamba"] if name == "mamba" else s["transformer"]
        trainable = ("" if info["trained_parameters"] == info["num_parameters"]
                     else f", of which {info['trained_parameters']:,} can train")
        loss = f"; final training loss {t['final_loss']:.3g}" if t.get("final_loss") is not None else ""
        stages = "".join(f"{c['steps']} steps x batch {c['batch_size']} at length {c['seq_len']}, then "
                         for c in t.get("curriculum", []))
        lines.append(f"- {info['paper_row']} ({info['class']}, {info['num_parameters']:,} parameters{trainable}): "
                     f"{stages}{t['steps']} steps x batch {tr['batch_size']} at length {s['train_len']}, lr {tr['lr']:g} "
                     f"constant after {tr['warmup_steps']} warm-up steps, Adam (no weight decay), grad clip "
                     f"{tr['grad_clip']:g}{loss}")
    reasons = {}
    for info in results["models"].values():
        for entry in info["accuracy"].values():
            if entry["status"] != "ok":
                reasons.setdefault(entry["reason"].split(":")[0], []).append(
                    f"{info['paper_row']} @ {_exp2(entry['length'])}: {entry['reason']}")
    for key, mark in notes.items():
        lines.append(f"- skip[{mark}] ({key}): " + "; ".join(reasons.get(key, [])[:3])
                     + (" ..." if len(reasons.get(key, [])) > 3 else ""))
    lines.append(f"- memory budget {s['memory_budget'] / 1e9:g} GB and time budget {s['time_budget']:g} s per "
                 "transformer and length (estimates from leanseq.bench.context); recurrent models read in "
                 f"chunks of {s['prefill_chunk']} tokens at constant memory.")
    return "\n".join(lines) + "\n"


def _samples(results: dict, length: int) -> str:
    values = {info["accuracy"][str(length)]["samples"] for info in results["models"].values()
              if str(length) in info["accuracy"]}
    return "/".join(str(v) for v in sorted(values)) if values else "-"


def format_selective_copy_table(results: dict) -> str:
    s = results["settings"]
    lines = [
        "## Selective Copying: accuracy (%) on the answer tokens",
        "",
        "| model (architecture / layer) | paper | leanseq | params | training |",
        "|---|---|---|---|---|",
    ]
    for name, info in results["models"].items():
        row = info["paper_row"]
        t = info["training"]
        lines.append(f"| {row} ({'LTI, S4-like' if name == 'lti' else 'selective'}) | "
                     f"{PAPER_SELECTIVE_COPY[row]:g} | **{_pct(info['accuracy'])}** | "
                     f"{info['num_parameters'] / 1e3:.1f}K | {t['steps']} steps |")
    lines.append("")
    lines.append(f"Paper figures: {PAPER_SELECTIVE_COPY_SOURCE} (other rows: "
                 + ", ".join(f"{k} {v:g}" for k, v in PAPER_SELECTIVE_COPY.items()
                             if k not in SELECTIVE_COPY_PAPER_ROW.values()) + ").")
    tr = s["train"]
    stages = "".join(f"{c[2]} steps x batch {c[1]} at context {c[0]}, then " for c in tr.get("curriculum") or ())
    if stages:
        lines.append(f"- training curriculum: {stages}{tr['steps']} steps at context {s['seq_len']}")
    lines.append(f"- leanseq: context {s['seq_len']} (paper 4096), {s['num_tokens_to_copy']} tokens to copy, "
                 f"vocabulary {s['vocab_size']}, 2 layers, D = {s['d_model']}; batch {tr['batch_size']}, "
                 f"lr {tr['lr']:g} constant after {tr['warmup_steps']} warm-up steps, Adam (no weight decay) "
                 f"(paper: 400K steps, lr 1e-4, batch 64); accuracy over {s['eval_samples']} held-out sequences.")
    return "\n".join(lines) + "\n"


def plot_induction(results: dict, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for info in results["models"].values():
        ok = [(int(n), e["accuracy"]) for n, e in info["accuracy"].items() if e["status"] == "ok"]
        ok.sort()
        line = ax.plot([n for n, _ in ok], [100 * a for _, a in ok], "o-", label=f"{info['paper_row']} (leanseq)")[0]
        paper = PAPER_INDUCTION[info["paper_row"]]["acc"]
        ks = sorted(paper)
        ax.plot([2**k for k in ks], [paper[k] for k in ks], "x--", color=line.get_color(), alpha=0.5,
                label=f"{info['paper_row']} (paper)")
    train_len = results["settings"]["train_len"]
    ax.axvline(train_len, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("test sequence length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Induction heads, trained at {train_len}: leanseq vs {PAPER_INDUCTION_SOURCE.split(',')[0]} Table 11",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def plot_selective_copy(results: dict, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    labels = [results["models"][n]["paper_row"] for n in names]
    ours = [100 * results["models"][n]["accuracy"] for n in names]
    paper = [PAPER_SELECTIVE_COPY[label] for label in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], paper, width=0.4, label="paper (Table 1)", alpha=0.6)
    ax.bar([i + 0.2 for i in x], ours, width=0.4, label="leanseq")
    for i, v in enumerate(ours):
        ax.text(i + 0.2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Selective copying (context {results['settings']['seq_len']})", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    fig.tight_layout()
    path = save_figure_atomic(fig, path, format="png", dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict, out_dir: str | os.PathLike, stem: str, table: str, plotter,
                  command: str | None = None) -> dict[str, Path]:
    """<stem>.md (the table, with the command that produced it), <stem>.json and <stem>.png in out_dir."""
    out = Path(out_dir)
    header = f"Produced by `{command}`.\n\n" if command else ""
    load = results["metadata"].get("load_average_1m")
    footer = (f"\nRun: {results['metadata']['date_utc']}, {results['metadata']['machine']['cpu']}, "
              f"{results['metadata']['torch_threads']} torch threads, load average {load if load is None else f'{load:.2f}'}, "
              f"{results['total_wall_s'] / 60:.1f} min in all.\n")
    paths = {
        "table": write_file_atomic(out / f"{stem}.md", header + table + footer),
        "json": write_file_atomic(out / f"{stem}.json", json.dumps(results, indent=2, default=str) + "\n"),
    }
    paths["plot"] = plotter(results, out / f"{stem}.png")
    return paths
