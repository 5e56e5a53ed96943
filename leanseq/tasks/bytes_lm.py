"""Byte-level language modelling: predict every next byte of windows cut from a text.

    task = BytesLMConfig(source="leanseq.text.corpus:load_corpus", seq_len=256)
    inputs, targets, loss_mask = task.generate(8, generator)   # (8, 256) each; every position is an answer

Training windows start uniformly at random in the "train" split (inputs = bytes[s : s+L], targets =
bytes[s+1 : s+L+1]); the held-out stream (`held_out_batches`, used by the trainer's fixed evaluation set)
draws windows the same way from the "validation" split. The loss is on every position, so the trainer's
eval_loss is nats per byte; `eval_metrics` adds bits per byte and nats per character (UTF-8 characters:
bytes that are not continuation bytes), the unit nanoGPT's shakespeare_char reports.

Where the bytes come from (`source`), so this room never imports the rooms above it:
- "package.module:function": an importable function called with the split name ("train" or
  "validation") that returns bytes, e.g. the text room's "leanseq.text.corpus:load_corpus";
- a folder path holding train.txt and validation.txt (any bytes).
Each source's splits are read once per process and kept as uint8 tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path

import torch

from leanseq.tasks.base import Batch, BatchIterator, TaskConfig

SPLITS = ("train", "validation")
_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def load_source(source: str, split: str) -> torch.Tensor:
    """The bytes of `split` from `source` as a 1-D uint8 tensor (cached)."""
    key = (source, split)
    if key in _CACHE:
        return _CACHE[key]
    if ":" in source and not Path(source).exists():
        module_name, _, attr = source.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"bytes_lm.source {source!r}: cannot import {attr} from {module_name} ({exc})") from exc
        data = func(split)
    else:
        path = Path(source) / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"bytes_lm.source {source!r}: {path} does not exist (a folder source holds "
                                    "train.txt and validation.txt)")
        data = path.read_bytes()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"bytes_lm.source {source!r} returned {type(data).__name__} for {split!r}, expected bytes")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    _CACHE[key] = tensor
    return tensor


@dataclasses.dataclass
class BytesLMConfig(TaskConfig):
    name = "bytes_lm"

    source: str = "leanseq.text.corpus:load_corpus"  # see the module docstring
    seq_len: int = 256  # bytes per window (the model reads seq_len, predicts the next byte at each)
    split: str = "train"  # the split training windows come from; the held-out stream uses "validation"
    vocab_size: int = 256  # byte ids 0..255 (a larger model vocabulary, e.g. for special tokens, is fine)

    def __post_init__(self):
        self._check_int("seq_len", 1)
        self._check_int("vocab_size", 256)
        if not isinstance(self.source, str) or not self.source:
            raise TypeError(f"bytes_lm.source must be a non-empty string, got {self.source!r}")
        if self.split not in SPLITS:
            raise ValueError(f"bytes_lm.split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    @property
    def total_len(self) -> int:
        return self.seq_len

    def data(self) -> torch.Tensor:
        data = load_source(self.source, self.split)
        if data.numel() < self.seq_len + 1:
            raise ValueError(f"bytes_lm: the {self.split} split of {self.source!r} has {data.numel()} bytes, "
                             f"fewer than seq_len + 1 = {self.seq_len + 1}")
        return data

    def _generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        data = self.data()
        starts = torch.randint(0, data.numel() - self.seq_len, (batch_size, 1), generator=generator)
        index = starts + torch.arange(self.seq_len + 1)  # (B, L + 1)
        window = data[index].long()
        inputs, targets = window[:, :-1], window[:, 1:].contiguous()
        return Batch(inputs.contiguous(), targets, torch.ones_like(targets, dtype=torch.bool))

    def held_out_batches(self, batch_size: int, seed: int = 0) -> BatchIterator:
        return BatchIterator(dataclasses.replace(self, split="validation"), batch_size, seed)

    def eval_metrics(self, eval_loss: float, eval_set: list[Batch]) -> dict:
        """Bits per byte and nats per character from the mean loss per byte over `eval_set`."""
        n_bytes = sum(int(mask.sum()) for _, _, mask in eval_set)
        # a UTF-8 character starts at every byte that is not a continuation byte (0b10xxxxxx)
        n_chars = sum(int(((targets & 0xC0) != 0x80)[mask].sum()) for _, targets, mask in eval_set)
        return {"eval_bits_per_byte": eval_loss / math.log(2),
                "eval_nats_per_char": eval_loss * n_bytes / max(1, n_chars)}
