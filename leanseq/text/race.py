"""`leanseq lm race`: a Mamba and a transformer of similar size, trained on the same bytes with the same
energy budget, compared by validation bits per byte against training joules.

    from leanseq.text.race import RaceSettings, run_race
    result = run_race(RaceSettings(budget_joules=4000), out_dir="leanseq-out/lm-race")

How it is fair:
- Same data: both read windows of the Shakespeare train split (leanseq/text/corpus.py) from the same seeded
  stream (the bytes_lm task, leanseq/tasks/bytes_lm.py) and are evaluated on the same fixed windows of the
  validation split.
- Same energy: every training step is metered by leanseq.energy (one Meter, so one method for both: RAPL
  where readable, else the labelled CPU-time estimate); a model stops at its first step that reaches the
  budget (so each overshoots by less than one step; the table gives the exact joules). Evaluation and
  checkpoint writing are metered apart and not charged to the budget.
- Same conditions: the models take turns in slices of budget / slices joules, and the order flips every
  round, so the machine's speed drift (up to 2x over minutes on shared machines) hits both alike.
- Same recipe: AdamW, warm-up, then a cosine decay driven by the fraction of the budget spent (the number of
  steps a budget buys is not known in advance), the same batch and window; each family's learning rate is
  its own setting.

Resumable: after each slice the model's trainer checkpoint (leanseq.train, with every RNG state) and
`race.json` are written atomically; a rerun with the same settings continues from the last finished slice.
Writes race.json, race.md (table) and race.png (plot; needs matplotlib) into the output folder, and each
trained model with its byte tokenizer into <out>/<model>/model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from leanseq.energy.machine import load_average
from leanseq.models.checkpoint import write_file_atomic

DEFAULT_SOURCE = "leanseq.text.corpus:load_corpus"
STATE_FILE = "race.json"
TABLE_FILE = "race.md"
PLOT_FILE = "race.png"
FORMAT_VERSION = 1
FAMILIES = ("mamba", "mamba2")


@dataclasses.dataclass
class ModelSpec:
    """One side of the race. family: mamba | mamba2 | transformer."""

    family: str
    d_model: int
    n_layers: int
    lr: float
    d_ff: int = 0  # transformer MLP width (SwiGLU)
    n_heads: int = 4  # transformer attention heads
    state_size: int = 16  # SSM state per channel (Mamba-1) / per head (Mamba-2)
    head_dim: int = 32  # Mamba-2 head width


@dataclasses.dataclass
class RaceSettings:
    # Per model. On the 2-core reference machine the estimate backend charges 6.75 W per busy core, so
    # 3000 J is 444 CPU-seconds: 3.7 minutes of wall time per model with both threads busy, 7.4 at worst
    # with one; both models plus evaluation stay inside the 20-minute target. RAPL (whole package) burns a
    # budget faster.
    budget_joules: float = 3000.0
    slices: int = 12  # evaluation points per model; the models alternate after each
    # Windows of 2048 bytes, 2 per step (4096 bytes per step). Why long windows: measured CPU-seconds per
    # training step of 4096 bytes (1 thread, this machine, medians of 3): transformer 0.30 / 0.41 / 0.48 /
    # 0.69 at windows of 256 / 512 / 1024 / 2048, attention growing with the window; Mamba (N = 8) 0.58 /
    # 0.61 / 0.63 / 0.64, flat (N = 16: 0.78-0.82; the scan's backward pass is about half of a Mamba step).
    # Long contexts on a CPU are what leanseq is about; at 256 the same budget buys the transformer twice
    # the steps. The setting is shared and printed with the results.
    seq_len: int = 2048
    batch_size: int = 2
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this when the budget is spent
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # fixed validation windows: eval_batches x eval_batch_size windows of seq_len (8 x 2048 bytes: about 3
    # CPU-seconds per evaluation here; both models read the same windows, so their difference is paired)
    eval_batches: int = 2
    eval_batch_size: int = 4
    seed: int = 0
    source: str = DEFAULT_SOURCE
    # ~0.5M parameters each (474,880 and 506,880; the Mamba is the smaller): Mamba 4 layers x 128 wide,
    # expand 2, state size 8; the Llama-style transformer 3 layers x 128 wide, SwiGLU 240, 4 heads, RoPE (its
    # layers are larger, so fewer). Counts are printed and stored.
    ssm: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec("mamba", 128, 4, lr=3e-3, state_size=8))
    transformer: ModelSpec = dataclasses.field(
        default_factory=lambda: ModelSpec("transformer", 128, 3, lr=1e-3, d_ff=240, n_heads=4))

    def __post_init__(self):
        if not (isinstance(self.budget_joules, (int, float)) and math.isfinite(self.budget_joules)
                and self.budget_joules > 0):
            raise ValueError(f"budget_joules must be a finite positive number, got {self.budget_joules!r}")
        for name in ("slices", "seq_len", "batch_size", "eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ssm.family not in FAMILIES:
            raise ValueError(f"the SSM side must be one of {', '.join(FAMILIES)}, got {self.ssm.family!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick_settings(**overrides) -> RaceSettings:
    """Seconds, not minutes: tiny models, short windows, a small budget (the numbers mean little)."""
    base = {"budget_joules": 20.0, "slices": 3, "seq_len": 64, "batch_size": 4, "warmup_steps": 2,
            "eval_batches": 2, "eval_batch_size": 4, "ssm": ModelSpec("mamba", 32, 1, lr=3e-3),
            "transformer": ModelSpec("transformer", 32, 1, lr=1e-3, d_ff=64, n_heads=2)}
    base.update(overrides)
    return RaceSettings(**base)


def build_model(spec: ModelSpec, vocab_size: int, seq_len: int, seed: int):
    torch.manual_seed(seed)
    if spec.family == "mamba":
        from leanseq.models.mamba import MambaConfig, MambaLM

        return MambaLM(MambaConfig(vocab_size=vocab_size, hidden_size=spec.d_model,
                                   num_hidden_layers=spec.n_layers, state_size=spec.state_size, expand=2))
    if spec.family == "mamba2":
        from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

        inner = 2 * spec.d_model
        if inner % spec.head_dim:
            raise ValueError(f"mamba2: 2 x d_model ({inner}) must be a multiple of head_dim ({spec.head_dim})")
        return Mamba2LM(Mamba2Config(vocab_size=vocab_size, hidden_size=spec.d_model,
                                     num_hidden_layers=spec.n_layers, state_size=spec.state_size, expand=2,
                                     head_dim=spec.head_dim, num_heads=inner // spec.head_dim, n_groups=1,
                                     tie_word_embeddings=True, pad_token_id=None, bos_token_id=None,
                                     eos_token_id=None))
    if spec.family == "transformer":
        from leanseq.models.transformer import TransformerConfig, TransformerLM

        return TransformerLM(TransformerConfig(
            vocab_size=vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
            num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, tie_word_embeddings=True,
            max_position_embeddings=max(2048, seq_len)))
    raise ValueError(f"unknown family {spec.family!r}; choose from mamba, mamba2, transformer")


def lr_at(spec: ModelSpec, settings: RaceSettings, step: int, spent: float) -> float:
    """Linear warm-up over the first steps, then cosine from lr to lr x min_lr_ratio over the budget."""
    if step < settings.warmup_steps:
        return spec.lr * (step + 1) / (settings.warmup_steps + 1)
    progress = min(1.0, spent / settings.budget_joules)
    floor = spec.lr * settings.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_metadata() -> dict:
    """Machine and versions, for reading the figures later (leanseq.bench has a fuller one; text sits below it)."""
    import platform

    import leanseq

    return {"platform": platform.platform(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": {"leanseq": leanseq.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "load_average_1m": load_average()}


class _Side:
    """One model of the race: its trainer, progress and evaluation curve."""

    def __init__(self, name: str, spec: ModelSpec, settings: RaceSettings, out: Path, progress: dict | None):
        from leanseq.tasks import BytesLMConfig
        from leanseq.text.tokenizer import ByteTokenizer
        from leanseq.train import OutputSection, Trainer, TrainSection

        self.name, self.spec, self.settings = name, spec, settings
        self.tokenizer = ByteTokenizer()
        # the model's vocabulary covers the tokenizer's specials too, so the saved model generates with it
        self.model = build_model(spec, self.tokenizer.vocab_size, settings.seq_len, settings.seed)
        task = BytesLMConfig(source=settings.source, seq_len=settings.seq_len)
        # steps: a cap never reached (the budget ends training); min_lr = lr and no warm-up make the trainer's
        # own schedule constant, because lr_at() sets the rate before every step
        section = TrainSection(steps=10**9, batch_size=settings.batch_size, lr=spec.lr, min_lr=spec.lr,
                               warmup_steps=0, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
                               eval_interval=0, eval_batches=settings.eval_batches,
                               eval_batch_size=settings.eval_batch_size, seed=settings.seed, device="cpu")
        self.dir = out / name
        self.trainer = Trainer(self.model, task, section,
                               OutputSection(dir=str(self.dir), progress=False, save_model=False))
        self.progress = progress or {"joules": 0.0, "steps": 0, "train_wall_s": 0.0, "train_cpu_s": 0.0,
                                     "eval_joules": 0.0, "points": [], "checkpoint": None, "done": False}

    @property
    def done(self) -> bool:
        return self.progress["done"]

    def restore(self) -> None:
        checkpoint = self.progress.get("checkpoint")
        if checkpoint:
            step = self.trainer.load_checkpoint(self.dir / checkpoint)
            if step != self.progress["steps"]:
                raise ValueError(f"{self.dir / checkpoint} is at step {step} but {STATE_FILE} says "
                                 f"{self.progress['steps']}; delete the output folder to start over")

    def train_slice(self, meter, until_joules: float, bar) -> dict:
        """Train until this model's metered training energy reaches `until_joules`; one Meter lap per step."""
        p = self.progress
        losses = []
        meter.start()
        try:
            while p["joules"] < until_joules:
                lr = lr_at(self.spec, self.settings, p["steps"], p["joules"])
                for group in self.trainer.optimizer.param_groups:
                    group["lr"] = lr
                record = self.trainer.train_step()
                lap = meter.lap()
                losses.append(record["loss"])
                p["joules"] += lap.energy_j
                p["train_wall_s"] += lap.wall_s
                p["train_cpu_s"] += lap.cpu_s
                p["steps"] += 1
                budget = self.settings.budget_joules  # the bar counts each model up to its budget
                bar.update(min(p["joules"], budget) - min(p["joules"] - lap.energy_j, budget))
                bar.set_postfix_str(f"{self.spec.family} step {p['steps']} loss {record['loss']:.3f}")
        finally:
            meter.stop()
        return {"train_loss": sum(losses) / len(losses) if losses else None}

    def evaluate(self, meter) -> dict:
        with meter.measure("eval") as window:
            metrics = self.trainer.evaluate()
        self.progress["eval_joules"] += window.result.energy_j
        return metrics

    def checkpoint(self, index: int) -> None:
        """A new checkpoint file per slice; race.json names it after it is written, and the previous file
        goes only after that, so a run killed anywhere resumes from a consistent pair."""
        name = f"checkpoint-{index:04d}.pt"
        self.trainer.save_checkpoint(self.dir / name)
        self._previous, self.progress["checkpoint"] = self.progress.get("checkpoint"), name

    def drop_previous_checkpoint(self) -> None:
        previous = getattr(self, "_previous", None)
        if previous and previous != self.progress["checkpoint"]:
            (self.dir / previous).unlink(missing_ok=True)


def run_race(settings: RaceSettings, out_dir: str | os.PathLike, progress: bool = True, log=print,
             meter_kwargs: dict | None = None) -> dict:
    """Train both models to the budget, alternating slices; resume from out_dir. Returns the race.json dict."""
    from tqdm.auto import tqdm

    from leanseq.energy import Meter
    from leanseq.train import OutputDirLock

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputDirLock(out)
    lock.acquire()  # a second race on the same folder is refused at once
    try:
        state = _load_state(out, settings)
        meter = Meter(**(meter_kwargs or {}))
        if state.get("energy_method") not in (None, meter.method):
            raise ValueError(f"{out / STATE_FILE} was metered with {state['energy_method']!r}, this run would use "
                             f"{meter.method!r}; joules from two methods do not add up. Use the same "
                             "--energy-backend/--cpu-watts or a new --out")
        state["energy_method"] = meter.method
        state["energy_backend_reason"] = meter.backend_reason
        sides = [_Side(name, spec, settings, out, state["models"].get(name, {}).get("progress"))
                 for name, spec in (("ssm", settings.ssm), ("transformer", settings.transformer))]
        for side in sides:
            state["models"].setdefault(side.name, {}).update(
                family=side.spec.family, num_parameters=side.model.num_parameters(),
                config=side.model.config.to_dict())
        log(f"lm race: budget {settings.budget_joules:g} J per model ({meter.method}); "
            + "; ".join(f"{s.spec.family} {s.model.num_parameters():,} parameters" for s in sides))
        total = settings.budget_joules * len(sides)
        bar = tqdm(total=total, initial=sum(min(s.progress["joules"], settings.budget_joules) for s in sides),
                   unit="J", desc="lm race", dynamic_ncols=True, disable=not progress,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} J [{elapsed}<{remaining}{postfix}]")
        started = time.perf_counter()
        try:
            with _holding(sides):
                for side in sides:
                    side.restore()
                if not any(s.progress["points"] for s in sides):
                    for side in sides:  # the untrained start of both curves
                        side.progress["points"].append({"slice": 0, "joules": 0.0, "steps": 0, "train_loss": None,
                                                        **side.evaluate(meter)})
                    _save_state(out, state, sides)
                slice_j = settings.budget_joules / settings.slices
                while not all(s.done for s in sides):
                    index = min(len(s.progress["points"]) for s in sides if not s.done)
                    order = sides if index % 2 else sides[::-1]  # flip the order every round (drift)
                    for side in order:
                        if side.done or len(side.progress["points"]) != index:
                            continue
                        until = min(settings.budget_joules, index * slice_j)
                        info = side.train_slice(meter, until, bar)
                        metrics = side.evaluate(meter)
                        p = side.progress
                        p["points"].append({"slice": index, "joules": p["joules"], "steps": p["steps"],
                                            "tokens": p["steps"] * settings.batch_size * settings.seq_len,
                                            **info, **metrics})
                        p["done"] = p["joules"] >= settings.budget_joules
                        side.checkpoint(index)
                        _save_state(out, state, sides)
                        side.drop_previous_checkpoint()
                        bar.set_postfix_str(f"{side.spec.family} {metrics['eval_bits_per_byte']:.3f} bpb")
        finally:
            bar.close()
        for side in sides:
            side.model.save_pretrained(side.dir / "model")
            side.tokenizer.save(side.dir / "model")
        state["wall_s_this_run"] = time.perf_counter() - started
        state["metadata"] = run_metadata()
        _save_state(out, state, sides)
        write_file_atomic(out / TABLE_FILE, format_table(state))
        plot = write_plot(state, out / PLOT_FILE)
        if plot is None:
            log("plot skipped: matplotlib is not installed (pip install 'leanseq[plot]')")
        return state
    finally:
        lock.release()


class _holding:
    """Hold every side's trainer output lock (leanseq.train) for the race's duration."""

    def __init__(self, sides):
        self.sides, self.stack = sides, []

    def __enter__(self):
        import contextlib

        self.stack = contextlib.ExitStack()
        for side in self.sides:
            self.stack.enter_context(side.trainer.holding_output_dir())
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _load_state(out: Path, settings: RaceSettings) -> dict:
    path = out / STATE_FILE
    fresh = {"format_version": FORMAT_VERSION, "settings": settings.to_dict(), "models": {}}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); delete the output folder to start over") from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {state.get('format_version')!r}; use a new --out")
    old = state.get("settings", {})
    new = settings.to_dict()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "budget_joules")
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)} differ); rerun with the "
                         "same settings to resume, or use a new --out")
    if new["budget_joules"] != old.get("budget_joules"):
        raise ValueError(f"{path} was run with a budget of {old.get('budget_joules')} J, not "
                         f"{new['budget_joules']} J (the learning-rate schedule depends on it); use a new --out")
    return state


def _save_state(out: Path, state: dict, sides) -> None:
    for side in sides:
        state["models"][side.name]["progress"] = side.progress
    write_file_atomic(out / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _label(state: dict, name: str) -> str:
    model = state["models"][name]
    return f"{model['family']} ({model['num_parameters'] / 1e6:.2f}M)"


def format_table(state: dict) -> str:
    """Markdown: validation bits per byte (and nats per character) against training joules, both models."""
    names = list(state["models"])
    settings = state["settings"]
    lines = [
        "# leanseq lm race: validation bits per byte at equal training energy",
        "",
        (f"Budget {settings['budget_joules']:g} J of training per model; energy {state['energy_method']}. "
         f"Windows of {settings['seq_len']} bytes, batch {settings['batch_size']}; validation: "
         f"{settings['eval_batches'] * settings['eval_batch_size']} fixed windows of the validation split."),
        "",
        "| slice | " + " | ".join(f"{_label(state, n)} J | steps | val bpb | nats/char" for n in names) + " |",
        "|---|" + "---|---|---|---|" * len(names),
    ]
    rows = max(len(state["models"][n]["progress"]["points"]) for n in names)
    for i in range(rows):
        cells = [str(i)]
        for n in names:
            points = state["models"][n]["progress"]["points"]
            if i < len(points):
                p = points[i]
                cells += [f"{p['joules']:.1f}", str(p["steps"]), f"{p['eval_bits_per_byte']:.3f}",
                          f"{p['eval_nats_per_char']:.3f}"]
            else:
                cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    finals = {n: state["models"][n]["progress"]["points"][-1] for n in names}
    lines += ["", "At the budget:"]
    for n in names:
        p = finals[n]
        lines.append(f"- {_label(state, n)}: {p['eval_bits_per_byte']:.3f} bits per byte "
                     f"({p['eval_nats_per_char']:.3f} nats per character) after {p['steps']} steps, "
                     f"{p['joules']:.1f} J of training")
    if all(state["models"][n]["progress"]["done"] for n in names):
        best = min(names, key=lambda n: finals[n]["eval_bits_per_byte"])
        lines.append(f"- lower at equal energy: **{state['models'][best]['family']}**")
    else:
        lines.append("- the race is not finished; rerun the same command to continue it")
    return "\n".join(lines) + "\n"


def write_plot(state: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, model in state["models"].items():
        points = model["progress"]["points"]
        ax.plot([p["joules"] for p in points], [p["eval_bits_per_byte"] for p in points], marker="o",
                label=_label(state, name))
    ax.set_xlabel(f"training energy, J ({state['energy_method'].split(':')[0]})")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Same bytes, same energy budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
