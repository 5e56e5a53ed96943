"""Synthetic tasks from the SSM literature, as seeded, vectorised batch generators.

    task = get_task("induction_heads", seq_len=512)          # a config dataclass
    for inputs, targets, loss_mask in task.batches(batch_size=8, seed=0): ...   # each (B, L)
    acc = accuracy(logits, targets, loss_mask)

Tasks: selective_copying and induction_heads (Mamba, arXiv 2312.00752), mqar (Zoology, arXiv 2312.04927);
bytes_lm, next-byte prediction over a text (whose bytes a higher room such as leanseq.text supplies).
"""

from __future__ import annotations

import difflib

from leanseq.tasks.base import IGNORE_INDEX, Batch, BatchIterator, TaskConfig, accuracy
from leanseq.tasks.bytes_lm import BytesLMConfig
from leanseq.tasks.induction_heads import InductionHeadsConfig
from leanseq.tasks.mqar import MQAR_PRESETS, MQARConfig
from leanseq.tasks.selective_copying import SelectiveCopyingConfig

TASKS: dict[str, type[TaskConfig]] = {
    cls.name: cls for cls in (SelectiveCopyingConfig, InductionHeadsConfig, MQARConfig, BytesLMConfig)
}


def get_task(name: str, **overrides) -> TaskConfig:
    """The config of task `name` with its defaults, updated by `overrides` (unknown keys are errors)."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (tasks: {', '.join(sorted(TASKS))})")
    return TASKS[name].from_dict(overrides)


__all__ = [
    "IGNORE_INDEX",
    "MQAR_PRESETS",
    "TASKS",
    "Batch",
    "BatchIterator",
    "BytesLMConfig",
    "InductionHeadsConfig",
    "MQARConfig",
    "SelectiveCopyingConfig",
    "TaskConfig",
    "accuracy",
    "get_task",
]
