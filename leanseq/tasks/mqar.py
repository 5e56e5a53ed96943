"""Multi-Query Associative Recall, MQAR (Arora, Eyuboglu et al. 2023, "Zoology", arXiv 2312.04927).

A sequence opens with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys distinct, values distinct).
Later each key appears once more as a query; at a query position the model must output that key's value.
The distance from the context to a query follows a power law with exponent `power_a`: gap slot g
(1-based) has probability proportional to g^(power_a - 1), so with the default 0.01 most queries come soon
after the context and a long tail comes late, like repeated bigrams in natural text.

Settings (Zoology, section 3 and appendix): vocabulary 8192 (large vocabularies separate architectures),
(seq_len, num_kv_pairs) in MQAR_PRESETS = (64, 4), (128, 8), (256, 16), power_a = 0.01, and positions that
are neither pairs nor queries filled with random tokens (`random_non_queries`). Layout, with keys drawn
from [1, vocab_size // 2) and values from [vocab_size // 2, vocab_size):

    inputs   k1 v1 k2 v2 .. | r r k2 r k1 r r ...    (queries at even offsets 2*gap after the context)
    targets  -100 ...       | . . v2 . v1 . . ...    (loss on the query positions only)

The total length is seq_len. Sampling is vectorised: keys and values by top-k of random scores, gaps by
`torch.multinomial` without replacement over the power-law weights.
"""

from __future__ import annotations

import dataclasses

import torch

from leanseq.tasks.base import IGNORE_INDEX, Batch, TaskConfig

MQAR_PRESETS = ((64, 4), (128, 8), (256, 16))  # (seq_len, num_kv_pairs) from the Zoology paper


@dataclasses.dataclass
class MQARConfig(TaskConfig):
    name = "mqar"

    seq_len: int = 64
    vocab_size: int = 8192
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        self._check_int("num_kv_pairs", 1)
        self._check_int("vocab_size", 4)
        self._check_int("seq_len", 4)
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise ValueError(f"mqar.power_a must be a positive number, got {self.power_a!r}")
        self.power_a = float(self.power_a)
        if not isinstance(self.random_non_queries, bool):
            raise TypeError(f"mqar.random_non_queries must be true or false, got {self.random_non_queries!r}")
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(
                f"mqar.seq_len ({self.seq_len}) must be >= 4 * num_kv_pairs ({4 * self.num_kv_pairs}): "
                "2 tokens per pair in the context plus room for one query per pair"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(
                f"mqar.vocab_size ({self.vocab_size}) is too small for {self.num_kv_pairs} distinct keys "
                f"drawn from [1, {self.vocab_size // 2})"
            )

    @property
    def total_len(self) -> int:
        return self.seq_len

    def gap_probabilities(self) -> torch.Tensor:
        """P(query in gap slot g) for g = 1 .. (seq_len - 2 * num_kv_pairs) // 2, a power law."""
        slots = (self.seq_len - 2 * self.num_kv_pairs) // 2
        g = torch.arange(1, slots + 1, dtype=torch.float64)
        p = g ** (self.power_a - 1.0)
        return p / p.sum()

    def _generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, n, L, V = batch_size, self.num_kv_pairs, self.seq_len, self.vocab_size
        half = V // 2
        context = 2 * n
        # distinct keys in [1, half) and distinct values in [half, V): random subsets via top-k of scores
        keys = torch.rand(B, half - 1, generator=generator).topk(n, dim=1).indices + 1  # (B, n)
        values = torch.rand(B, V - half, generator=generator).topk(n, dim=1).indices + half  # (B, n)

        gaps = torch.multinomial(self.gap_probabilities().expand(B, -1), n, replacement=False, generator=generator)
        query_pos = context + 2 * gaps  # (B, n), slot index 0-based -> even offsets after the context

        if self.random_non_queries:
            inputs = torch.randint(0, V, (B, L), generator=generator)
        else:
            inputs = torch.zeros((B, L), dtype=torch.long)
        inputs[:, 0:context:2] = keys
        inputs[:, 1:context:2] = values
        inputs.scatter_(1, query_pos, keys)
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        targets.scatter_(1, query_pos, values)
        return Batch(inputs, targets, targets != IGNORE_INDEX)
