"""What every synthetic task shares: the batch layout, a seeded batch iterator and the accuracy metric.

A batch is `(inputs, targets, loss_mask)`, all shaped (B, L): `inputs` are int64 token ids, `targets` hold
the token the model must predict at each answer position and IGNORE_INDEX (-100) elsewhere, and
`loss_mask = targets != IGNORE_INDEX` marks the answer positions. So both
`F.cross_entropy(logits.flatten(0, 1), targets.flatten())` (whose default ignore_index is -100) and an
explicit mask give the loss on the answer positions only.

Generation draws only from a `torch.Generator` owned by the caller, never from the global RNG, so a task
stream is reproducible from its seed and can be checkpointed with `state_dict()`.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from typing import ClassVar, NamedTuple

import torch

IGNORE_INDEX = -100


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, IGNORE_INDEX off the answer positions
    loss_mask: torch.Tensor  # (B, L) bool


class TaskConfig(abc.ABC):
    """Mixin for a task's config dataclass. Subclasses set `name` and implement `_generate` and `total_len`."""

    name: ClassVar[str] = ""

    # ---- to implement -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        """One batch; `generate` has already checked the arguments."""

    @property
    @abc.abstractmethod
    def total_len(self) -> int:
        """L, the length of every generated sequence."""

    # ---- shared -------------------------------------------------------------------------------------------
    def generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        """One batch drawn from `generator` (a CPU torch.Generator); tensors are on the CPU."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return self._generate(batch_size, generator)

    def batches(self, batch_size: int, seed: int = 0) -> BatchIterator:
        """An endless, deterministic iterator of batches for this config."""
        return BatchIterator(self, batch_size, seed)

    def held_out_batches(self, batch_size: int, seed: int = 0) -> BatchIterator:
        """The batches a trainer evaluates on. Synthetic tasks draw them like training batches (from a seed no
        training stream uses); a task over a data set overrides this to read its validation split."""
        return self.batches(batch_size, seed)

    def eval_metrics(self, eval_loss: float, eval_set: list[Batch]) -> dict:
        """Task-specific figures derived from the mean held-out loss (e.g. bits per byte); none by default."""
        return {}

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> TaskConfig:
        """Build from a mapping, rejecting unknown keys and wrong types by name."""
        data = {k: v for k, v in data.items() if k != "name"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
                raise ValueError(f"{cls.name} task: unknown key {key!r}{hint}")
        return cls(**data)

    def _check_int(self, field: str, minimum: int) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{self.name}.{field} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{self.name}.{field} must be >= {minimum}, got {value}")


class BatchIterator:
    """Endless batches from one task config and one seeded generator; checkpointable."""

    def __init__(self, config: TaskConfig, batch_size: int, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.config = config
        self.batch_size = batch_size
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return self.config.generate(self.batch_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of masked positions whose argmax equals the target (per token for multi-token answers).

    logits (B, L, V), targets (B, L), mask (B, L) bool; without a mask, positions whose target is
    IGNORE_INDEX are skipped.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, seq_len, vocab), got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape[:2])}")
    if mask is None:
        mask = targets != IGNORE_INDEX
    if mask.shape != targets.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    count = int(mask.sum())
    if count == 0:
        raise ValueError("mask selects no positions; accuracy is undefined")
    correct = (logits.argmax(dim=-1) == targets) & mask
    return int(correct.sum()) / count
