"""A briefly trained byte-level Mamba too big for the CPU cache, trained on first use and cached.

int8 weights pay off in decode when a float32 step has to read its weights from memory. The bundled
shakespeare-mamba (2 MB) sits in the cache, so the post-training benchmark also needs a *trained* model of a
size that does not (about 55 MB of float32 against a 32 MB L3). Such weights are not shipped in the
repository: `load_or_train(recipe)` trains the recipe's model once on the Shakespeare corpus with leanseq's
Trainer (seeded, a fixed number of steps, a progress bar) and keeps it under
$LEANSEQ_CACHE/models/<name> (default ~/.cache/leanseq/models/<name>); later calls load it from there.

    from leanseq.text.trained import SHAKESPEARE_14M, load_or_train
    model, record = load_or_train(SHAKESPEARE_14M)   # record: steps, tokens seen, wall seconds, bits/byte

The folder holds `model/` (a leanseq checkpoint with the byte tokenizer, so `leanseq generate -m` works),
`run/` (the Trainer's metrics.jsonl, and its checkpoint until the training completes: an interrupted training
resumes from its last checkpoint)
and `trained.json`, written last, which records the recipe it was trained with. A folder whose recipe differs
from the one asked for is trained again from scratch. It is a small model trained for minutes, not a good
language model: `record["eval_bits_per_byte"]` says how good.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from leanseq import fileio

RECORD_FILE = "trained.json"
RECORD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TextModelRecipe:
    name: str  # folder name under the cache
    hidden_size: int = 1024
    num_hidden_layers: int = 2
    state_size: int = 16
    expand: int = 2
    vocab_size: int = 257  # 256 bytes + <|endoftext|>, as the bundled shakespeare-mamba
    source: str = "leanseq.text.corpus:load_corpus"  # bytes_lm source: the corpus, or a folder of train/validation.txt
    seq_len: int = 128  # bytes per training window
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 15
    weight_decay: float = 0.1
    eval_batches: int = 8  # final evaluation: held-out windows of the validation split
    eval_batch_size: int = 16
    checkpoint_interval: int = 25  # an interrupted training resumes from here
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"recipe name must be a plain folder name, got {self.name!r}")

    @property
    def tokens(self) -> int:
        """Bytes the training reads (steps x batch x window)."""
        return self.steps * self.batch_size * self.seq_len


# the post-training benchmark's model: Mamba-1, 2 layers, d_model 1024 (13.6M parameters, 54 MB float32),
# 150 steps of 8 x 128 bytes (154k bytes, about 1/30 of one pass over the train split)
SHAKESPEARE_14M = TextModelRecipe(name="shakespeare-mamba-14m")


def cache_root() -> Path:
    return fileio.cache_root() / "models"


def run_config(recipe: TextModelRecipe, out_dir: Path, progress: bool):
    """The leanseq.train RunConfig that trains `recipe` into out_dir."""
    from leanseq.train.config import build_run_config

    return build_run_config({
        "model": {"family": "mamba", "hidden_size": recipe.hidden_size,
                  "num_hidden_layers": recipe.num_hidden_layers, "state_size": recipe.state_size,
                  "expand": recipe.expand, "vocab_size": recipe.vocab_size},
        "task": {"name": "bytes_lm", "source": recipe.source, "seq_len": recipe.seq_len},
        "train": {"steps": recipe.steps, "batch_size": recipe.batch_size, "lr": recipe.lr,
                  "min_lr": recipe.min_lr, "warmup_steps": recipe.warmup_steps,
                  "weight_decay": recipe.weight_decay, "eval_interval": 0, "eval_batches": recipe.eval_batches,
                  "eval_batch_size": recipe.eval_batch_size, "seed": recipe.seed, "device": "cpu"},
        "output": {"dir": str(out_dir), "checkpoint_interval": recipe.checkpoint_interval, "resume": True,
                   "save_model": False, "progress": progress},
    })


def read_record(folder: Path) -> dict | None:
    """trained.json of a complete folder, or None (missing, unreadable, or another format)."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format_version") != RECORD_VERSION:
        return None
    return record


def load_or_train(recipe: TextModelRecipe, cache: str | os.PathLike | None = None, progress: bool = True,
                  threads: int | None = None):
    """(model, record): the cached model trained with `recipe`, training it first when the cache has none.

    threads: torch threads while training (default: as set). The record holds the recipe, the parameters, the
    steps and bytes trained on, the wall seconds of the training that made it, and the final validation loss.
    """
    import torch

    import leanseq
    from leanseq.models.checkpoint import write_file_atomic
    from leanseq.text.tokenizer import ByteTokenizer
    from leanseq.train import build_trainer

    folder = Path(cache) if cache is not None else cache_root()
    folder = folder / recipe.name
    wanted = dataclasses.asdict(recipe)
    record = read_record(folder)
    if record is not None and record.get("recipe") == wanted and (folder / "model").is_dir():
        model = leanseq.load(folder / "model")
        if model.num_parameters() == record.get("parameters"):
            return model, record
        # a model/ folder that is not the one the record describes: trained again below
    # nothing usable: train. A run/ folder left by an interrupted training of this same recipe resumes; one
    # of another recipe (or without a record of its recipe) is removed first.
    run_dir = folder / "run"
    started = folder / "recipe.json"
    try:
        same_recipe = json.loads(started.read_text()) == wanted
    except (OSError, ValueError):
        same_recipe = False
    if not same_recipe:
        for stale in (run_dir, folder / "model", folder / RECORD_FILE):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        write_file_atomic(started, json.dumps(wanted, indent=2) + "\n")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        trainer = build_trainer(run_config(recipe, run_dir, progress))
        resumed_at = trainer.step
        summary = trainer.fit()
        if "eval_loss" not in summary:  # resumed from a checkpoint already at the last step: fit() ran nothing
            summary.update(trainer.evaluate())
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    model = trainer.model.eval()
    model.save_pretrained(folder / "model", tokenizer=ByteTokenizer())
    record = {
        "format_version": RECORD_VERSION, "recipe": wanted, "parameters": model.num_parameters(),
        "float32_bytes": 4 * model.num_parameters(), "steps": recipe.steps, "tokens": recipe.tokens,
        "train_seconds": seconds, "resumed_at_step": resumed_at,
        "threads": threads if threads is not None else previous_threads, "torch": torch.__version__,
        "final_train_loss": summary.get("loss"),
        "eval_bits_per_byte": summary.get("eval_bits_per_byte"), "eval_loss": summary.get("eval_loss"),
        "eval_bytes": recipe.eval_batches * recipe.eval_batch_size * recipe.seq_len,
    }
    write_file_atomic(folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")  # last: marks the folder complete
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # optimizer state, 3x the weights: only a resume needs it
    return leanseq.load(folder / "model"), record
