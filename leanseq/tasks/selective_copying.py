"""Selective Copying (Gu & Dao 2023, "Mamba", arXiv 2312.00752, section 4.1 and appendix E.1).

A context of `seq_len` positions holds `num_tokens_to_copy` data tokens at random positions among noise
tokens; after the context come `num_tokens_to_copy` marker tokens, and at the i-th marker the model must
output the i-th data token (data tokens in their order of appearance). Which positions hold data changes
from sequence to sequence, so a time-invariant model cannot solve it: it tests content-aware selection.

Settings (paper defaults, appendix E.1): context length 4096, vocabulary of 16 tokens including the noise
token, 16 data tokens to memorise. Token layout used here:

    0                   noise
    1 .. vocab_size-2   data tokens (drawn uniformly, repeats allowed)
    vocab_size-1        marker: "output the next data token now"

    inputs   n d n n d n ... n | m  m  ... m          (seq_len context, then num_tokens_to_copy markers)
    targets  -100 ...     -100 | d1 d2 ... dk         (loss only on the answer positions)

so every batch has total length L = seq_len + num_tokens_to_copy. Generation is vectorised (one top-k over
random scores to pick the data positions), so long contexts are cheap.
"""

from __future__ import annotations

import dataclasses

import torch

from leanseq.tasks.base import IGNORE_INDEX, Batch, TaskConfig

NOISE_TOKEN = 0


@dataclasses.dataclass
class SelectiveCopyingConfig(TaskConfig):
    name = "selective_copying"

    seq_len: int = 4096  # context length (noise + data); the answer region follows it
    vocab_size: int = 16  # includes the noise token and the marker token
    num_tokens_to_copy: int = 16

    def __post_init__(self):
        self._check_int("vocab_size", 3)
        self._check_int("num_tokens_to_copy", 1)
        self._check_int("seq_len", 1)
        if self.seq_len < self.num_tokens_to_copy:
            raise ValueError(
                f"selective_copying.seq_len ({self.seq_len}) must be >= num_tokens_to_copy "
                f"({self.num_tokens_to_copy}): the context must hold every data token"
            )

    @property
    def marker_token(self) -> int:
        return self.vocab_size - 1

    @property
    def total_len(self) -> int:
        return self.seq_len + self.num_tokens_to_copy

    def _generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, n, ctx = batch_size, self.num_tokens_to_copy, self.seq_len
        data = torch.randint(1, self.vocab_size - 1, (B, n), generator=generator)  # (B, n)
        # n distinct positions per row, uniformly: the top-n of i.i.d. scores, kept in sequence order
        scores = torch.rand(B, ctx, generator=generator)
        positions = scores.topk(n, dim=1).indices.sort(dim=1).values  # (B, n)

        inputs = torch.full((B, ctx + n), NOISE_TOKEN, dtype=torch.long)
        inputs.scatter_(1, positions, data)
        inputs[:, ctx:] = self.marker_token
        targets = torch.full((B, ctx + n), IGNORE_INDEX, dtype=torch.long)
        targets[:, ctx:] = data
        return Batch(inputs, targets, targets != IGNORE_INDEX)
