"""Classify a sequence far longer than memory would hold at once: chunk by chunk, constant memory.

    stream = StreamingClassifier(model, chunk_size=4096)
    for chunk in chunks_of_ids:              # (L_i,) or (B, L_i) ids, any lengths (multiples of the patch)
        stream.push(chunk)
    logits = stream.logits()                 # equals model(all ids) for rc "none" and "ph"'s forward strand

The backbone's recurrent state (a leanseq State: conv window + SSM state, the same object
leanseq.stream.Session carries) is passed from chunk to chunk through model.lm.forward_hidden, and the pooled
features are kept as a running max / sum / last row, so memory does not grow with the sequence (a
transformer's KV cache does grow: it streams exactly, but not at constant memory). The stream's state saves
to leanseq.stream's self-checking blob format (versioned, checksummed, tied to the weights) and restores.

Both strands (rc="ps" and rc="ph"'s averaging) need the reverse complement, which a left-to-right pass
cannot see: use `classify_long(model, ids)`, which streams the forward strand left to right and the reverse
complement right to left (reading the same ids backwards, chunk by chunk), both at constant memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanseq.dna.fasta import reverse_complement_ids
from leanseq.dna.models import DNAClassifier, check_ids


class StreamingClassifier:
    """One strand, left to right: push chunks of ids, read pooled logits at any point."""

    def __init__(self, model: DNAClassifier, batch_size: int = 1):
        if model.lm is None:
            raise ValueError("the CNN baseline has no recurrent state to stream; run it on whole sequences")
        self.model = model.eval()
        self.batch_size = batch_size
        self.state = model.lm.init_state(batch_size)
        self.pooled: torch.Tensor | None = None  # (B, D): running max, sum or last row
        self.length = 0
        # the last kmer_width - patch bases: the next chunk's first token reads them (None before any chunk)
        self.tail: torch.Tensor | None = None

    @torch.no_grad()
    def push(self, ids: torch.Tensor) -> None:
        if ids.dim() == 1:
            ids = ids[None]
        check_ids(ids)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"chunk has {ids.shape[0]} rows, the stream {self.batch_size}")
        cfg = self.model.config
        hidden, self.state = self.model._backbone_hidden(ids, state=self.state, return_state=True,
                                                         left=self.tail)  # (B, l, D)
        overlap = cfg.kmer_width - cfg.patch
        if overlap > 0:
            both = ids if self.tail is None else torch.cat([self.tail, ids], dim=1)
            if both.shape[1] < overlap:
                raise ValueError(f"the first chunk must hold at least {overlap} bases")
            self.tail = both[:, -overlap:]
        how = self.model.config.pooling
        if how == "max":
            part = hidden.amax(1)
            self.pooled = part if self.pooled is None else torch.maximum(self.pooled, part)
        elif how == "mean":
            part = hidden.sum(1)
            self.pooled = part if self.pooled is None else self.pooled + part
        else:
            self.pooled = hidden[:, -1]
        self.length += hidden.shape[1]

    def features(self) -> torch.Tensor:
        if self.pooled is None:
            raise RuntimeError("nothing has been pushed yet")
        return self.pooled / self.length if self.model.config.pooling == "mean" else self.pooled

    def logits(self) -> torch.Tensor:
        """The head on the pooled features (B, num_outputs): model.logits_one_strand of everything pushed
        (for rc="ps" this is one strand's half only; classify_long combines both)."""
        return self.model.head(self.features())

    def state_bytes(self) -> bytes:
        """The stream (recurrent state + pooled features + length) in leanseq.stream's blob format."""
        from leanseq.stream import blob

        info = {"batch_size": self.batch_size, "position": int(self.state.position[0]),
                "prefill_chunk_size": 1, "metadata": {
                    "dna_length": self.length, "pooled": None if self.pooled is None else self.pooled.tolist(),
                    "tail": None if self.tail is None else self.tail.tolist()}}
        return blob.encode(self.model.lm, self.state, None, info)

    @classmethod
    def restore(cls, model: DNAClassifier, data: bytes) -> StreamingClassifier:
        from leanseq.stream import blob

        state, _, info = blob.decode(model.lm, data)
        stream = cls(model, info["batch_size"])
        stream.state = state
        meta = info.get("metadata") or {}
        stream.length = int(meta.get("dna_length", 0))
        pooled = meta.get("pooled")
        stream.pooled = None if pooled is None else torch.tensor(pooled, dtype=model.lm.dtype)
        tail = meta.get("tail")
        stream.tail = None if tail is None else torch.tensor(tail, dtype=torch.long)
        return stream


@torch.no_grad()
def classify_long(model: DNAClassifier, ids: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Logits (B, num_outputs) for (B, L) ids at constant memory in L, equal to model(ids) in eval mode.

    The forward strand streams left to right; for rc="ps" and rc="ph" the reverse complement streams too,
    taking chunks from the end of `ids` backwards (so `ids` may be a memory-mapped or lazily read tensor).
    """
    if ids.dim() == 1:
        ids = ids[None]
    check_ids(ids)
    k = model.config.patch
    if chunk_size % k:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of the model's patch size {k}")
    L = ids.shape[1]
    fwd = StreamingClassifier(model, ids.shape[0])
    for start in range(0, L, chunk_size):
        fwd.push(ids[:, start:start + chunk_size])
    if model.config.rc == "none":
        return fwd.logits()
    rev = StreamingClassifier(model, ids.shape[0])
    for end in range(L, 0, -chunk_size):
        rev.push(reverse_complement_ids(ids[:, max(0, end - chunk_size):end]))
    if model.config.rc == "ps":
        w = model.head.weight
        return F.linear(fwd.features(), w) + F.linear(rev.features(), w) + model.head.bias
    return (fwd.logits() + rev.logits()) / 2
