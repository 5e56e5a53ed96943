"""Induction Heads (Gu & Dao 2023, "Mamba", arXiv 2312.00752, section 4.1 and appendix E.1; the task of
Olsson et al. 2022 as set up in H3, Fu et al. 2023).

A sequence of random tokens contains a special trigger token exactly twice: once at a random position,
followed by some token t, and once at the very end. At the final position the model must output t, the
token that followed the trigger's first occurrence (associative recall by copying). The loss is on that
one answer position only.

Settings (paper, appendix E.1): vocabulary 16, training sequence length 2^8 = 256, evaluated on lengths
up to 2^20 to test extrapolation. Token layout used here:

    0 .. vocab_size-2   ordinary tokens (uniform)
    vocab_size-1        the trigger

    inputs   x x x T t x x ... x T
    targets  -100 ...            t        (only the last position is an answer)

The first trigger sits uniformly in [0, seq_len - 3] so that t is never the final position. Generation is
three vectorised ops per batch (uniform tokens, one scatter, one gather), so 2^20-token sequences are cheap.
"""

from __future__ import annotations

import dataclasses

import torch

from leanseq.tasks.base import IGNORE_INDEX, Batch, TaskConfig


@dataclasses.dataclass
class InductionHeadsConfig(TaskConfig):
    name = "induction_heads"

    seq_len: int = 256  # total length L, trigger-answer at the last position
    vocab_size: int = 16  # includes the trigger token

    def __post_init__(self):
        self._check_int("vocab_size", 3)
        self._check_int("seq_len", 3)

    @property
    def trigger_token(self) -> int:
        return self.vocab_size - 1

    @property
    def total_len(self) -> int:
        return self.seq_len

    def _generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, L = batch_size, self.seq_len
        inputs = torch.randint(0, self.vocab_size - 1, (B, L), generator=generator)  # never the trigger
        first = torch.randint(0, L - 2, (B, 1), generator=generator)  # (B, 1) in [0, L-3]
        inputs.scatter_(1, first, self.trigger_token)
        inputs[:, -1] = self.trigger_token
        answer = inputs.gather(1, first + 1)  # (B, 1) the token after the first trigger
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        targets[:, -1:] = answer
        return Batch(inputs, targets, targets != IGNORE_INDEX)
