"""`leanseq dna long-range`: two real JASPAR motifs far apart; the label needs both, and their orientations.

The task. Each sequence is i.i.d. background whose GC content equals the mean GC content of the two motifs'
position frequency matrices (so composition gives nothing away), with motif instances sampled base by base
from the matrices (JASPAR 2026 through pyjaspar, offline; sharpened, see SHARPEN): CTCF (MA0139.1, 19 bp) and Pou5f1::Sox2
(MA0142.1, 15 bp), at independent uniform positions anywhere in the sequence (never overlapping), so
they lie up to the whole length apart. Each instance is on the forward or the reverse strand.

    label 1: both motifs present, in the same orientation (both forward or both reverse-complemented)
    label 0: both present in opposite orientations (80% of negatives), or one of them missing (20%)

Classes are balanced. The label is invariant under reverse complement. A model must find both motifs and
carry the first one's orientation across up to the whole sequence: a CNN with global pooling sees each
motif but cannot relate two orientations far apart (its ceiling is the "one missing" negatives: 60%).

Protocol. Every model is trained on a curriculum of short lengths (settings.curriculum: length, fresh
sequences, epochs; in order) and evaluated at every length in settings.eval_lengths on fresh sequences
(settings.n_test per length). Training and test sequences come from disjoint random seeds. Before each
evaluation, the time and memory of that length are predicted from the previous length (x2 per doubling
for linear models, x4 for attention); a model whose prediction is over settings.time_budget_s or
settings.memory_budget_gib is not run at that length, and the table says why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanseq.dna.fasta import reverse_complement_ids
from leanseq.dna.models import DNAClassifier, DNAConfig, save_classifier
from leanseq.dna.train import fit

MOTIFS = ("MA0139.1", "MA0142.1")  # CTCF, Pou5f1::Sox2
NEG_MISSING = 0.2  # fraction of negatives with one motif missing
# Planted sites are drawn from the matrices raised to this power (renormalised): close to the consensus, with
# some variation where the matrix is uncertain (1 would copy the matrix's full spread, many sites then barely
# resembling the motif; a fixed consensus string would have none).
SHARPEN = 3.0


def motif_probabilities(ids=MOTIFS) -> list[tuple[str, torch.Tensor]]:
    """[(name, (W, 4) probabilities over A C G T)] from the JASPAR database that pyjaspar ships."""
    from pyjaspar import jaspardb

    db = jaspardb()
    out = []
    for mid in ids:
        motif = db.fetch_motif_by_id(mid)
        if motif is None:
            raise ValueError(f"JASPAR motif {mid} is not in pyjaspar's database ({db.release})")
        counts = torch.tensor([list(motif.counts[b]) for b in "ACGT"], dtype=torch.float64).T  # (W, 4)
        probs = (counts + 0.25) / (counts + 0.25).sum(1, keepdim=True)
        probs = probs ** SHARPEN
        probs = probs / probs.sum(1, keepdim=True)
        out.append((f"{motif.name} ({mid})", probs.float()))
    return out


def gc_content(probs: list[torch.Tensor]) -> float:
    return float(torch.cat(probs)[:, 1:3].sum(1).mean())


def make_dataset(n: int, length: int, seed: int, motifs: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences (n, length) of ids and labels (n,); see the module docstring. Deterministic in seed."""
    widths = [p.shape[0] for _, p in motifs]
    if length < 2 * sum(widths):
        raise ValueError(f"length {length} is too short for two motifs of {widths} bp; use >= {2 * sum(widths)}")
    gen = torch.Generator().manual_seed(seed)
    gc = gc_content([p for _, p in motifs])
    background = torch.tensor([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])
    x = torch.multinomial(background, n * length, replacement=True, generator=gen).view(n, length)
    y = torch.zeros(n, dtype=torch.long)
    y[torch.randperm(n, generator=gen)[: n // 2]] = 1
    r = torch.rand(n, 4, generator=gen)  # orientation of motif 0, negative kind, which is missing
    for i in range(n):
        orient0 = bool(r[i, 0] < 0.5)
        present = [True, True]
        if y[i] == 1:
            orient1 = orient0
        elif r[i, 1] < NEG_MISSING:
            present[int(r[i, 2] < 0.5)] = False
            orient1 = bool(r[i, 3] < 0.5)
        else:
            orient1 = not orient0
        # two non-overlapping start positions, uniform
        while True:
            starts = torch.randint(0, length - max(widths) + 1, (2,), generator=gen).tolist()
            if abs(starts[0] - starts[1]) >= max(widths):
                break
        for k, ((_, probs), start, rc) in enumerate(zip(motifs, starts, (orient0, orient1))):
            if not present[k]:
                continue
            site = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (W,)
            if rc:
                site = reverse_complement_ids(site)
            x[i, start:start + len(site)] = site
    return x, y


@dataclass
class LongRangeSpec:
    name: str
    config: dict
    lr: float
    batch_size: int = 32
    time_exponent: float = 1.0      # how its cost grows with length: 1 linear, 2 attention
    memory_exponent: float = 1.0


def default_specs() -> list[LongRangeSpec]:
    # Mamba and the transformer share the input: 4-base tokens, each embedded from the 20 bases ending at it
    # (a causal strided conv: a motif-sized window), so they differ only in how tokens talk to each other
    common = {"hidden_size": 32, "num_layers": 2, "patch": 4, "embed_width": 20, "pooling": "max", "rc": "none"}
    return [
        LongRangeSpec("mamba", {"backbone": "mamba", **common, "state_size": 8}, lr=5e-3),
        LongRangeSpec("transformer", {"backbone": "transformer", **common, "num_heads": 4, "intermediate_size": 64},
                      lr=5e-3, time_exponent=2.0, memory_exponent=2.0),
        LongRangeSpec("cnn", {"backbone": "cnn", "cnn_filters": 64, "cnn_width": 21, "pooling": "max"}, lr=1e-2),
    ]


@dataclass
class LongRangeSettings:
    # the training curriculum, in order: (length in bp, fresh sequences, epochs over them)
    curriculum: tuple[tuple[int, int, int], ...] = ((128, 16000, 8), (512, 4000, 2), (2048, 1000, 2),
                                                   (8192, 800, 2))
    eval_lengths: tuple[int, ...] = tuple(2 ** k for k in range(10, 16))
    n_test: int = 200
    time_budget_s: float = 180.0         # CPU seconds per model and length, for the evaluation
    memory_budget_gib: float = 4.0
    seed: int = 0
    specs: list[LongRangeSpec] = field(default_factory=default_specs)

    def __post_init__(self):
        self.curriculum = tuple(tuple(int(v) for v in stage) for stage in self.curriculum)
        self.eval_lengths = tuple(sorted(int(v) for v in self.eval_lengths))
        if not self.curriculum or any(len(stage) != 3 for stage in self.curriculum):
            raise ValueError("curriculum must be a non-empty list of (length, sequences, epochs)")
        for v in (*(stage[0] for stage in self.curriculum), *self.eval_lengths):
            if v < 128 or v % 4:
                raise ValueError(f"lengths must be multiples of 4 and >= 128, got {v}")
        if self.n_test < 2 or any(n < 2 or e < 1 for _, n, e in self.curriculum):
            raise ValueError("n_test and each stage's sequences must be >= 2, its epochs >= 1")


def quick_settings() -> LongRangeSettings:
    specs = [dataclasses.replace(s, config={**s.config, "hidden_size": 8, "num_layers": 1, "num_heads": 2,
                                            "intermediate_size": 16, "cnn_filters": 8, "embed_width": 8})
             if s.name != "cnn" else dataclasses.replace(s, config={**s.config, "cnn_filters": 8})
             for s in default_specs()]
    return LongRangeSettings(curriculum=((128, 64, 1),), eval_lengths=(128, 512), n_test=16, specs=specs)


@torch.no_grad()
def _evaluate(model: DNAClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    model.eval()
    preds = []
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size])
        preds.append((logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1))
    pred = torch.cat(preds)
    return float((pred == y).float().mean()), pred


def run_long_range(settings: LongRangeSettings | None = None, out_dir: str | os.PathLike | None = "leanseq-out/dna",
                   progress: bool = True, log=print, meter_kwargs: dict | None = None) -> dict:
    """Train each model on the curriculum, evaluate at every length within budget; returns the report dict
    (and writes long_range.json, .md, .png to out_dir)."""
    from tqdm.auto import tqdm

    from leanseq.dna.classify import run_metadata
    from leanseq.energy import Meter

    settings = settings or LongRangeSettings()
    motifs = motif_probabilities()
    meter = Meter(**(meter_kwargs or {}))
    out = Path(out_dir) if out_dir is not None else None
    start_wall = time.perf_counter()
    cpu_start = time.process_time()
    test_sets = {}
    models = []
    for spec in settings.specs:
        torch.manual_seed(settings.seed)
        model = DNAClassifier(DNAConfig(**spec.config))
        stages, train_j, train_s = [], 0.0, 0.0
        for stage, (length, n_seq, epochs) in enumerate(settings.curriculum):
            x, y = make_dataset(n_seq, length, 1000 * (stage + 1) + settings.seed, motifs)
            fitted = fit(model, x, y, epochs=epochs, lr=spec.lr, batch_size=spec.batch_size,
                         seed=settings.seed + stage, progress=progress, desc=f"{spec.name} train @{length}",
                         meter=meter)
            train_acc, _ = _evaluate(model, x[:256], y[:256], spec.batch_size)
            stages.append({"length": length, "sequences": n_seq, "epochs": epochs,
                           "final_loss": fitted.final_loss, "train_accuracy": train_acc,
                           "joules": fitted.train_joules, "seconds": fitted.train_seconds})
            train_j += fitted.train_joules
            train_s += fitted.train_seconds
            log(f"{spec.name}: trained at {length} bp, loss {fitted.final_loss:.3f}, train accuracy {train_acc:.3f}, "
                f"{fitted.train_joules:.0f} J")
        rows, previous = [], None
        for length in tqdm(settings.eval_lengths, desc=f"{spec.name} eval", disable=not progress, leave=False):
            if length not in test_sets:
                test_sets[length] = make_dataset(settings.n_test, length, 7 + settings.seed, motifs)
            x, y = test_sets[length]
            if previous is not None:
                ratio = length / previous["length"]
                t_pred = previous["cpu_seconds"] * ratio ** spec.time_exponent
                m_pred = previous["peak_gib"] * ratio ** spec.memory_exponent
                reason = None
                if t_pred > settings.time_budget_s:
                    reason = f"predicted {t_pred:.0f} CPU-s > {settings.time_budget_s:.0f} CPU-s budget"
                elif m_pred > settings.memory_budget_gib:
                    reason = f"predicted {m_pred:.1f} GiB > {settings.memory_budget_gib:g} GiB budget"
                if reason:
                    rows.append({"length": length, "accuracy": None, "skipped": reason})
                    log(f"{spec.name} @{length}: not run ({reason})")
                    continue
            batch = max(1, min(spec.batch_size, (1 << 17) // length)) if spec.time_exponent == 1 else \
                max(1, min(spec.batch_size, (1 << 14) // length))
            with meter.measure(label=f"{spec.name} eval @{length}") as w:
                acc, _ = _evaluate(model, x, y, batch)
            m = w.result
            # working memory of this evaluation: the window's peak RSS above its start (inputs excluded)
            peak = max(0, (m.peak_rss_bytes or 0) - (m.rss_start_bytes or 0)) / 2**30
            row = {"length": length, "accuracy": acc, "joules": m.energy_j, "joules_per_sequence": m.energy_j / len(y),
                   "seconds": m.wall_s, "cpu_seconds": m.cpu_s, "peak_gib": peak, "batch": batch}
            rows.append(row)
            previous = row
            log(f"{spec.name} @{length}: accuracy {acc:.3f}, {row['joules_per_sequence']:.3g} J/sequence, "
                f"{m.wall_s:.1f} s")
        if out is not None:
            save_classifier(model, out / "long-range-models" / spec.name)
        models.append({"name": spec.name, "spec": dataclasses.asdict(spec), "parameters": model.num_parameters(),
                       "train": stages, "train_joules": train_j, "train_seconds": train_s, "lengths": rows})
    report = {"task": "long-range", "motifs": [name for name, _ in motifs],
              "background_gc": gc_content([p for _, p in motifs]), "negatives_with_one_missing": NEG_MISSING,
              "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "specs"},
              "energy_method": meter.method, "models": models,
              "wall_seconds": time.perf_counter() - start_wall,
              "cpu_seconds": time.process_time() - cpu_start, "meta": run_metadata()}
    if out is not None:
        write_report(report, out)
    return report


def format_table(report: dict) -> str:
    lengths = report["settings"]["eval_lengths"]
    head = "| model | parameters | trained at | " + " | ".join(f"{n:,} bp" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (3 + len(lengths))]
    for m in report["models"]:
        cells = []
        for r in m["lengths"]:
            if r.get("accuracy") is None:
                cells.append(f"not run: {r['skipped']}")
            else:
                cells.append(f"{r['accuracy']:.3f} ({r['joules_per_sequence']:.3g} J/seq)")
        trained = ", ".join(str(s["length"]) for s in m["train"])
        lines.append(f"| {m['name']} | {m['parameters']:,} | {trained} bp ({m['train_joules']:.0f} J) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    from leanseq.dna.report import length_plot
    from leanseq.models.checkpoint import write_file_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / "long_range.json", json.dumps(report, indent=1) + "\n")
    s = report["settings"]
    md = [f"# leanseq dna long-range ({report['meta']['time_utc']})", "",
          (f"Motifs: {', '.join(report['motifs'])} in GC-matched background (GC {report['background_gc']:.3f}); "
          f"label 1 = both present, same orientation. Each model trained on the curriculum "
          f"{', '.join(f'{n:,} sequences of {length:,} bp x {e} epochs' for length, n, e in s['curriculum'])}; "
          f"evaluated on {s['n_test']} fresh sequences per length. Budget per model and length: "
          f"{s['time_budget_s']:.0f} CPU-seconds, {s['memory_budget_gib']:g} GiB of working memory (predicted "
           "from the previous length; a model over either is not run there)."), "",
          "Accuracy (joules per classified sequence):", "", format_table(report),
          (f"Energy: {report['energy_method']}. Wall time of the whole run: {report['wall_seconds']:.0f} s, "
           f"CPU time {report['cpu_seconds']:.0f} s "
          f"(torch {report['meta']['torch']}, {report['meta']['threads']} threads)."), ""]
    write_file_atomic(out / "long_range.md", "\n".join(md))
    length_plot(report, out / "long_range.png")


def accuracy_at(report: dict, name: str, length: int) -> float | None:
    for m in report["models"]:
        if m["name"] == name:
            for r in m["lengths"]:
                if r["length"] == length:
                    return r.get("accuracy")
    return None


__all__ = [
    "LongRangeSettings",
    "LongRangeSpec",
    "accuracy_at",
    "make_dataset",
    "motif_probabilities",
    "quick_settings",
    "run_long_range",
]
