"""One trainer for every leanseq model (anything with `model(input_ids) -> logits (B, L, V)`).

AdamW with linear warm-up and cosine decay, gradient clipping, evaluation on a fixed held-out set, atomic
checksummed checkpoints that hold everything a run needs to continue bit for bit (weights, optimizer,
scheduler, python/torch/task RNG states, step), a tqdm bar with loss and tokens/s, and metrics.jsonl.
Under torchrun it wraps the model in DistributedDataParallel; see distributed.py for how data is sharded.

    from leanseq.train import load_config, run
    summary = run(load_config("cfg.toml", ["train.steps=100"]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanseq.fileio import SHARED, write_file_atomic
from leanseq.tasks import TASKS, TaskConfig
from leanseq.train import distributed
from leanseq.train.checkpoint import TrainCheckpointError, load_train_state, save_train_state
from leanseq.train.config import MODEL_FAMILIES, OutputSection, RunConfig, TrainSection
from leanseq.train.lock import OutputDirBusyError, OutputDirLock

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
MODEL_DIR = "model"
EVAL_SEED_OFFSET = 2**32  # the held-out stream never coincides with any run's training stream
# [train] settings that only steer evaluation, logging, the end of the run or where it runs: a resume may
# change them (with a warning). Every other setting, and the model and task, shape the steps already taken.
RESUMABLE_TRAIN_KEYS = frozenset({"steps", "eval_interval", "eval_batches", "eval_batch_size", "log_interval",
                                  "device"})


def build_model(model_config: dict) -> nn.Module:
    """[model] section (family + family config keys) -> a freshly initialised model."""
    from leanseq.models import model_class

    keys = {k: v for k, v in model_config.items() if k != "family"}
    cls = model_class(MODEL_FAMILIES[model_config["family"]])
    return cls(cls.config_class.from_dict(keys))


def lr_schedule(train: TrainSection):
    """Multiplier of train.lr for 0-based step s: linear warm-up, then cosine down to min_lr at the end."""
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        decay_steps = max(1, train.steps - 1 - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / decay_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases, or the SSM's A_log and D (as in the Mamba recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() < 2 or leaf in ("A_log", "D") or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _metrics_lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl whose step is <= `step`.

    A last line that does not parse is what a run killed in the middle of a write leaves: it is dropped with
    a warning. A bad line anywhere else is damage nobody should resume over: TrainCheckpointError naming it.
    """
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the newline after the last record
    kept = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = None if isinstance(record, dict) and isinstance(record.get("step", 0), int) \
                else "not a JSON object with an integer step"
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            if number == len(lines):
                warnings.warn(f"{path}: dropping its last line {number}, cut off by an interrupted write "
                              f"({problem})", stacklevel=3)
                continue
            raise TrainCheckpointError(
                f"{path}: line {number} is not a metrics record ({problem}); repair or delete that line to resume"
            )
        if record.get("step", 0) <= step:
            kept.append(raw.decode())
    return kept


def _changes(old, new, prefix: str) -> dict[str, tuple]:
    """{'section.key': (old, new)} for every key whose value differs (the whole value when not dicts)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return {} if old == new else {prefix: (old, new)}
    return {f"{prefix}.{key}": (old.get(key), new.get(key))
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}


def _describe(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        task: TaskConfig,
        train: TrainSection,
        output: OutputSection,
        run_config: dict | None = None,
    ):
        self.dist = distributed.current()
        if train.batch_size % self.dist.world_size:
            raise ValueError(
                f"train.batch_size ({train.batch_size}) must be divisible by the number of ranks "
                f"({self.dist.world_size})"
            )
        if getattr(model, "vocab_size", task.vocab_size) < task.vocab_size:
            raise ValueError(f"the model's vocabulary ({model.vocab_size}) is smaller than the task's ({task.vocab_size})")
        self.task, self.train_cfg, self.output_cfg = task, train, output
        self.run_config = run_config
        self.device = _resolve_device(train.device, self.dist)
        self.local_batch = train.batch_size // self.dist.world_size
        self.model = model.to(self.device)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.module = self.model
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(train))
        self.train_stream = task.batches(train.batch_size, seed=train.seed)
        held_out = task.held_out_batches(train.eval_batch_size, seed=train.seed + EVAL_SEED_OFFSET)
        self.eval_set = [next(held_out) for _ in range(train.eval_batches)]
        self.step = 0
        self.losses: list[float] = []  # training loss of every step this process ran, in order
        self.out_dir = Path(output.dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_FILE
        self.metrics_path = self.out_dir / METRICS_FILE
        self._output_lock = OutputDirLock(self.out_dir)  # taken by rank 0 only
        self._holds_output = False  # on every rank: whether rank 0 holds the lock for this trainer

    # ---- the output folder's lock -------------------------------------------------------------------------
    def _hold_output_dir(self) -> None:
        """Lock output.dir for this run (rank 0 takes the lock), or fail on every rank at once.

        A second run on the same folder is refused here, before it writes anything, instead of silently
        interleaving checkpoints and metrics with the first.
        """
        if self._holds_output:
            return
        failure = None
        if self.dist.is_main:
            try:
                self._output_lock.acquire()
            except OSError as exc:
                failure = exc
        if self.dist.enabled:  # every rank learns rank 0's outcome, so none waits at a collective forever
            box = [None if failure is None else str(failure)]
            torch.distributed.broadcast_object_list(box, src=0)
            if failure is None and box[0] is not None:
                failure = OutputDirBusyError(f"rank 0: {box[0]}")
        if failure is not None:
            raise failure
        self._holds_output = True

    def _release_output_dir(self) -> None:
        self._output_lock.release()
        self._holds_output = False

    @contextlib.contextmanager
    def holding_output_dir(self):
        """Hold output.dir's lock for a caller that drives train_step / evaluate / save_checkpoint itself
        instead of fit() (leanseq lm race alternates two trainers in slices); released on leaving."""
        self._hold_output_dir()
        try:
            yield self
        finally:
            self._release_output_dir()

    # ---- one step -----------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Draw the global batch, keep this rank's rows, one AdamW step. Returns loss, lr, grad_norm."""
        inputs, targets, mask = next(self.train_stream)  # (B_global, L) each
        global_count = int(mask.sum())
        if global_count == 0:
            raise ValueError("the task produced a batch with no answer positions; nothing to learn from")
        rows = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        inputs, targets, mask = (t[rows].to(self.device) for t in (inputs, targets, mask))

        self.module.train()
        lr = self.optimizer.param_groups[0]["lr"]
        logits = self.module(inputs)  # (b, L, V)
        loss_sum = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {loss_sum.item()} (NaN or infinite)")
        # DDP averages gradients over ranks, so scale by world_size / global_count: the result is the
        # gradient of the mean loss over the global batch, as in a single-process run.
        (loss_sum * (self.dist.world_size / global_count)).backward()
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = loss_sum.detach()
        if self.dist.enabled:
            torch.distributed.all_reduce(loss_sum)
        self.step += 1
        return {"loss": loss_sum.item() / global_count, "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and per-token accuracy on the answer positions of the fixed held-out batches, plus the task's
        own figures (TaskConfig.eval_metrics)."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for inputs, targets, mask in self.eval_set:
            inputs, targets, mask = inputs.to(self.device), targets.to(self.device), mask.to(self.device)
            logits = self.model(inputs)[mask].float()  # (N, V) on the answer positions
            loss_sum += F.cross_entropy(logits, targets[mask], reduction="sum").item()
            correct += int((logits.argmax(-1) == targets[mask]).sum())
            count += int(mask.sum())
        self.model.train(was_training)
        result = {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}
        result.update(self.task.eval_metrics(result["eval_loss"], self.eval_set))  # e.g. bits per byte
        return result

    # ---- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm.auto import tqdm

        self._hold_output_dir()  # before anything is written to output.dir
        try:
            return self._fit(tqdm)
        finally:
            self._release_output_dir()

    def _fit(self, tqdm) -> dict:
        cfg, main = self.train_cfg, self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                write_file_atomic(self.out_dir / RUN_CONFIG_FILE, json.dumps(self.run_config, indent=2) + "\n",
                                  mode=SHARED)
        tokens_per_step = cfg.batch_size * self.task.total_len
        bar = tqdm(
            total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
            disable=not (self.output_cfg.progress and main),
        )
        train_time, steps_timed, last_eval = 0.0, 0, None
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                record = self.train_step()
                elapsed = time.perf_counter() - start
                train_time += elapsed
                steps_timed += 1
                self.losses.append(record["loss"])
                record.update(step=self.step, tokens=self.step * tokens_per_step,
                              tokens_per_s=tokens_per_step / elapsed)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    self._log({"kind": "train", **record})
                at_end = self.step == cfg.steps
                # rank 0 evaluates alone (on the unwrapped model); the others wait at the next all-reduce
                if main and ((cfg.eval_interval and self.step % cfg.eval_interval == 0) or at_end):
                    last_eval = self.evaluate()
                    self._log({"kind": "eval", "step": self.step, **last_eval})
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{last_eval['eval_accuracy']:.3f}",
                                    tok_s=f"{record['tokens_per_s']:,.0f}")
                interval = self.output_cfg.checkpoint_interval
                if (interval and self.step % interval == 0) or at_end:
                    self.save_checkpoint()
        finally:
            bar.close()
        if main and self.output_cfg.save_model and hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(self.out_dir / MODEL_DIR)
        summary = {
            "step": self.step,
            "loss": self.losses[-1] if self.losses else None,
            "tokens_per_s": (steps_timed * tokens_per_step / train_time) if train_time else None,
        }
        if last_eval:
            summary.update(last_eval)
        return summary

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        config = getattr(self.model, "config", None)
        model_id = config.to_dict() if hasattr(config, "to_dict") else type(self.model).__name__
        return {"model": model_id, "task": self.task.to_dict(), "train": dataclasses.asdict(self.train_cfg)}

    def state_dict(self) -> dict:
        rng = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "task": self.train_stream.state_dict(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "identity": self._identity(),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Rank 0 writes the checkpoint atomically; the other ranks wait until it is in place."""
        path = Path(path) if path is not None else self.checkpoint_path
        if self.dist.is_main:
            save_train_state(path, self.state_dict())
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> int:
        """Restore everything from a checkpoint of this same model and task; returns the step.

        Holds output.dir's lock from here to the end of fit() (it rewrites metrics.jsonl). A checkpoint
        written with other settings that shape the training (model, task, seed, batch size, learning-rate
        schedule, optimizer) is refused unless output.allow_config_change is set; changed evaluation, logging,
        device or step-count settings are accepted with a warning.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        self._hold_output_dir()
        try:
            return self._load_checkpoint(path)
        except BaseException:
            self._release_output_dir()
            raise

    def _saved_train_settings(self, path: Path, identity: dict) -> dict | None:
        """The [train] settings the checkpoint was written with; older checkpoints lack them, and then the
        run_config.json beside the checkpoint (written when that run started) stands in, if readable."""
        if "train" in identity:
            return identity["train"]
        try:
            return json.loads((path.parent / RUN_CONFIG_FILE).read_text())["train"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_settings_match(self, path: Path, state: dict) -> None:
        mine = self._identity()
        saved_train = self._saved_train_settings(path, state["identity"])
        changed = {**_changes(state["identity"]["model"], mine["model"], "model"),
                   **_changes(state["identity"]["task"], mine["task"], "task")}
        if saved_train is not None:
            changed.update(_changes(saved_train, mine["train"], "train"))
        harmless = {k: v for k, v in changed.items() if k.removeprefix("train.") in RESUMABLE_TRAIN_KEYS}
        shaping = {k: v for k, v in changed.items() if k not in harmless}
        if shaping and not self.output_cfg.allow_config_change:
            kinds = " and ".join(noun for section, noun in (("model", "model"), ("task", "task"), ("train", "training setup"))
                                 if any(k.split(".")[0] == section for k in shaping))
            raise TrainCheckpointError(
                f"{path} was written for a different {kinds}: "
                f"{_describe(shaping)} (checkpoint -> this run). Resume with the checkpoint's values, set "
                f"output.allow_config_change=true to continue with the new ones anyway, or start a new output.dir"
            )
        if changed and self.dist.is_main:
            warnings.warn(f"resuming {path} with changed settings, which apply from step "
                          f"{int(state['step']) + 1} on: {_describe(changed)}", stacklevel=4)

    def _load_checkpoint(self, path: Path) -> int:
        state = load_train_state(path)
        self._check_settings_match(path, state)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise TrainCheckpointError(f"{path}: model weights do not fit this model: {exc}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.train_stream.load_state_dict(state["rng"]["task"])
        self.step = int(state["step"])
        if self.dist.is_main and self.metrics_path.exists():
            # drop records of steps after the checkpoint: the resumed run writes them again
            kept = _metrics_lines_up_to(self.metrics_path, self.step)
            write_file_atomic(self.metrics_path, "".join(line + "\n" for line in kept), mode=SHARED)
        return self.step


def run(config: RunConfig) -> dict:
    """Build everything a RunConfig describes and train; resumes from output.dir when asked. Returns a summary.

    Under torchrun this joins the process group the environment describes (and leaves it at the end).
    """
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    distributed.init_from_env(config.train.device)
    try:
        trainer = build_trainer(config)
        summary = trainer.fit()
        summary["num_parameters"] = sum(p.numel() for p in trainer.model.parameters())
        return summary
    finally:
        if joined_here:
            distributed.shutdown()


def build_trainer(config: RunConfig) -> Trainer:
    """Seed, build the model and task, and restore output.dir's checkpoint when resuming is on."""
    random.seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    task = TASKS[config.task["name"]].from_dict(config.task)
    trainer = Trainer(model, task, config.train, config.output, run_config=config.to_dict())
    if config.output.resume and trainer.checkpoint_path.exists():
        trainer.load_checkpoint()
    return trainer
