"""The training run's config: a TOML file with [model], [task], [train] and [output] sections.

    [model]                       # family plus that family's config keys (leanseq/models/<family>.py)
    family = "mamba"              # mamba | mamba2 | transformer
    d_model = 64                  # friendly aliases, see MODEL_KEY_ALIASES
    n_layers = 2

    [task]                        # a task from leanseq.tasks plus its config keys
    name = "induction_heads"
    seq_len = 256

    [train]                       # TrainSection below
    [output]                      # OutputSection below

Command-line overrides `--set section.key=value` parse the value as a TOML literal (`64`, `1e-3`, `true`,
`"text"`) and fall back to a plain string (`--set model.family=mamba2`). Every unknown section or key and
every wrongly typed value is an error that names it, with a suggestion for likely typos, because a
silently ignored setting is a run that trains something other than what was asked for.

`model.vocab_size` defaults to the task's vocabulary size.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from leanseq.models.config import ConfigError
from leanseq.tasks import TASKS

# [model] family -> the model_type whose class leanseq.models.model_class returns
MODEL_FAMILIES = {"mamba": "mamba", "mamba2": "mamba2", "transformer": "llama"}

# Short names accepted in [model]; each maps to the Hugging Face-style key the family configs use.
MODEL_KEY_ALIASES = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_layer": "num_hidden_layers",
    "d_state": "state_size",
    "n_heads": "num_attention_heads",
    "d_ff": "intermediate_size",
}

SECTIONS = ("model", "task", "train", "output")


def _check_int(section: str, name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{name}: must be an integer >= {minimum}, got {value!r}")


def _check_float(section: str, name: str, value: float, expected: str, in_range) -> None:
    """Refuse NaN, infinities and values outside `in_range`, naming the key and what it must be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not in_range(value):
        raise ConfigError(f"{section}.{name}: must be {expected}, got {value!r}")


@dataclasses.dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # global batch (split evenly over ranks under torchrun)
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    min_lr: float = 1e-4  # cosine decay ends here at the last step
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms, biases, A_log, D)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 100  # steps between evaluations; 0 evaluates only at the end
    eval_batches: int = 4  # held-out batches per evaluation (fixed for the whole run)
    eval_batch_size: int = 16
    log_interval: int = 10  # steps between train records in metrics.jsonl
    seed: int = 0  # seeds model init, the task stream and the held-out set
    device: str = "cpu"  # cpu | cuda | auto

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches", "eval_batch_size", "log_interval"):
            _check_int("train", name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_interval"):
            _check_int("train", name, getattr(self, name), minimum=0)
        # NaN passes every `<` comparison and inf passes `> 0`, so finiteness is checked first, by name
        _check_float("train", "lr", self.lr, "a finite positive number", lambda v: v > 0)
        _check_float("train", "min_lr", self.min_lr, "a finite number >= 0", lambda v: v >= 0)
        _check_float("train", "weight_decay", self.weight_decay, "a finite number >= 0", lambda v: v >= 0)
        _check_float("train", "grad_clip", self.grad_clip, "a finite number >= 0 (0 disables clipping)",
                     lambda v: v >= 0)
        for name in ("beta1", "beta2"):
            _check_float("train", name, getattr(self, name), "a finite number in [0, 1)", lambda v: 0 <= v < 1)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"train.device: must be cpu, cuda or auto, got {self.device!r}")


@dataclasses.dataclass
class OutputSection:
    dir: str = "runs/default"  # checkpoint.pt, metrics.jsonl, config.toml-equivalent JSON and model/ go here
    checkpoint_interval: int = 0  # steps between checkpoints; 0 writes one only at the end
    resume: bool = True  # continue from dir/checkpoint.pt when it exists
    # resume even though the model, task or a trajectory-shaping [train] setting (seed, batch_size, lr, ...)
    # differs from the checkpoint's; without it such a resume is refused, naming the changed keys
    allow_config_change: bool = False
    save_model: bool = True  # write dir/model (config.json + safetensors, loadable by leanseq.load)
    progress: bool = True  # tqdm progress bar (rank 0 only)

    def __post_init__(self):
        _check_int("output", "checkpoint_interval", self.checkpoint_interval, minimum=0)


@dataclasses.dataclass
class RunConfig:
    model: dict[str, Any]  # family + family config keys (aliases resolved)
    task: dict[str, Any]  # name + task config keys
    train: TrainSection
    output: OutputSection

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "task": dict(self.task),
            "train": dataclasses.asdict(self.train),
            "output": dataclasses.asdict(self.output),
        }


def _unknown(key: str, known, where: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {where}{close[0]}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ValueError(f"{where}{key}: unknown key{hint}")


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check one scalar setting against its field type; ints are accepted for floats."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{where} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{where} must be a string, got {value!r}")
    return value


def _dataclass_from(cls, section: str, data: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, fields, f"{section}.")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _pop_choice(data: dict[str, Any], dotted: str, choices: list[str], noun: str, plural: str) -> str:
    """Remove and return the required key `dotted` (section.key) from `data`, naming the choices if it is
    missing or unknown, with the closest match as a hint."""
    value = data.pop(dotted.split(".", 1)[1], None)
    if value is None:
        raise ValueError(f"{dotted} is required (one of: {', '.join(choices)})")
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{dotted}: unknown {noun} {value!r}{hint} ({plural}: {', '.join(choices)})")
    return value


def _model_section(data: dict[str, Any], task_vocab: int) -> dict[str, Any]:
    from leanseq.models import model_class

    data = dict(data)
    family = _pop_choice(data, "model.family", list(MODEL_FAMILIES), "family", "families")
    config_cls = model_class(MODEL_FAMILIES[family]).config_class
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        target = MODEL_KEY_ALIASES.get(key, key) if key not in fields else key
        if target not in fields:
            raise _unknown(key, fields | {a for a, t in MODEL_KEY_ALIASES.items() if t in fields}, "model.")
        if target in resolved:
            raise ValueError(f"model.{target} is set twice (once through the alias {key!r})")
        resolved[target] = value
    resolved.setdefault("vocab_size", task_vocab)
    try:  # validate types and values now, not after the run has started
        config_cls.from_dict(resolved)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"model ({family}): {exc}") from exc
    if resolved["vocab_size"] < task_vocab:
        raise ValueError(
            f"model.vocab_size ({resolved['vocab_size']}) is smaller than the task's vocabulary ({task_vocab})"
        )
    return {"family": family, **resolved}


def _task_section(data: dict[str, Any]):
    data = dict(data)
    name = _pop_choice(data, "task.name", sorted(TASKS), "task", "tasks")
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in fields:
            raise _unknown(key, fields, "task.")
    return cls(**data)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value), the value read as a TOML literal when it is one."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected section.key=value, e.g. train.steps=100")
    path, raw = text.split("=", 1)
    path = path.strip()
    if path.count(".") != 1:
        raise ValueError(f"--set {text!r}: the key must be section.key (sections: {', '.join(SECTIONS)})")
    section, key = path.split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML file (or start empty), apply `section.key=value` overrides, validate every key."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    for section, value in data.items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS, "")
        if not isinstance(value, dict):
            raise TypeError(f"[{section}] must be a table of settings, got {value!r}")
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS, "")
        data.setdefault(section, {})[key] = value
    return build_run_config(data)


def build_run_config(data: dict[str, dict[str, Any]]) -> RunConfig:
    task = _task_section(data.get("task", {}))
    model = _model_section(data.get("model", {}), task.vocab_size)
    train = _dataclass_from(TrainSection, "train", data.get("train", {}))
    output = _dataclass_from(OutputSection, "output", data.get("output", {}))
    return RunConfig(model=model, task=task.to_dict(), train=train, output=output)
