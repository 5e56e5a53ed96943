"""A Session owns one stream's recurrent state over a model: push tokens in, get logits out, save, restore.

    session = Session(model)
    logits = session.push(prompt_ids)        # (n, V): chunked prefill through model(x, state=...)
    logits = session.push(next_token)        # (V,): one recurrent model.step
    blob = session.state_bytes()             # versioned, checksummed, fingerprinted bytes
    same = Session.restore(model, blob)      # continues with bit-identical logits

Everything runs under torch.no_grad (not inference_mode: a transformer's KV cache is written in place on later
steps, which inference tensors forbid outside inference mode).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from leanseq.models.state import State, first_non_finite
from leanseq.stream import blob as blobfmt

DEFAULT_PREFILL_CHUNK_SIZE = 256


def coerce_tokens(model, token_ids, batch_size: int) -> tuple[torch.Tensor, str]:
    """Token ids in any accepted form -> ((B, n) LongTensor on the model's device, kind).

    A model that reads something other than token ids (e.g. a leanseq.series.SeriesModel reading real values)
    defines `coerce_stream_input(inputs, batch_size) -> ((B, n, ...) tensor, kind)` with the same kinds, and
    `output_size` (the last dimension of its outputs); the session then streams its inputs the same way.

    kind says how the caller's input was shaped, so the logits come back in the same shape:
    "scalar" (one token, batch 1) -> (V,); "row" (one token per row, (B,) with B > 1) -> (B, V);
    "seq" (n tokens, batch 1) -> (n, V); "batch" ((B, n)) -> (B, n, V).
    """
    coerce = getattr(model, "coerce_stream_input", None)
    if coerce is not None:
        return coerce(token_ids, batch_size)
    if isinstance(token_ids, bool) or (isinstance(token_ids, torch.Tensor) and token_ids.dtype == torch.bool):
        raise TypeError("token_ids must be integer token ids, got a bool")
    if isinstance(token_ids, float):
        raise TypeError(f"token_ids must be integer token ids, got the float {token_ids!r}")
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids
    else:
        try:
            ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"token_ids must be an int, a tensor or a sequence of ints, got {type(token_ids).__name__}"
            ) from exc
        if ids.numel() == 0:
            raise ValueError("token_ids is empty; push at least one token")
    if ids.dim() == 0:
        if batch_size != 1:
            raise ValueError(f"one token was given but the session has {batch_size} rows; pass a ({batch_size},) tensor")
        ids, kind = ids.reshape(1, 1), "scalar"
    elif ids.dim() == 1:
        if batch_size == 1:
            ids, kind = ids[None], "seq"
        elif ids.shape[0] == batch_size:
            ids, kind = ids[:, None], "row"
        else:
            raise ValueError(
                f"token_ids of shape {tuple(ids.shape)} do not fit a session of {batch_size} rows: "
                f"pass ({batch_size},) for one token per row or ({batch_size}, n) for n tokens per row"
            )
    elif ids.dim() == 2:
        if ids.shape[0] != batch_size:
            raise ValueError(f"token_ids has {ids.shape[0]} rows but the session has {batch_size}")
        kind = "batch"
    else:
        raise ValueError(f"token_ids must be 0-d, 1-d or 2-d, got shape {tuple(ids.shape)}")
    model.check_input_ids(ids, rank=2, what="token_ids")
    return ids.to(device=model.device, dtype=torch.long), kind


def shape_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, n, V) logits back into the shape of the input that produced them (see coerce_tokens)."""
    if kind == "scalar":
        return logits[0, 0]
    if kind == "row":
        return logits[:, 0]
    if kind == "seq":
        return logits[0]
    return logits


@torch.no_grad()
def run_tokens(model, state: State, ids: torch.Tensor, prefill_chunk_size: int, keep_logits: bool = True):
    """Consume ids (B, n) from state: one token by model.step, more in prefill chunks.

    Returns (logits (B, n, V), or (B, 1, V) for the last token only when keep_logits is False; new state).
    """
    n = ids.shape[1]
    if n == 1:
        logits, state = model.step(ids[:, 0], state)
        return logits[:, None], state
    pieces = []
    which = "all" if keep_logits else "last"  # "last" skips the LM head on the rows nobody will read
    for start in range(0, n, prefill_chunk_size):
        logits, state = model(ids[:, start : start + prefill_chunk_size], state=state, return_state=True,
                              logits=which)
        pieces.append(logits)
    return (torch.cat(pieces, dim=1) if keep_logits else pieces[-1]), state


def check_chunk_size(prefill_chunk_size) -> int:
    if isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}")
    return prefill_chunk_size


def output_size(model) -> int:
    """The last dimension of a model's outputs: its `output_size` where it states one, else the vocabulary."""
    size = getattr(model, "output_size", None)
    return int(size) if size is not None else model.vocab_size


def check_last_logits(model, last_logits, batch_size: int) -> None:
    """Refuse logits a session could not have produced: a (batch_size, vocab) tensor of the model's dtype, on
    its device, with finite values (None, before the first token, is fine)."""
    if last_logits is None:
        return
    if not isinstance(last_logits, torch.Tensor):
        raise TypeError(f"last_logits must be a torch.Tensor or None, got {type(last_logits).__name__}")
    expected = (batch_size, output_size(model))
    if tuple(last_logits.shape) != expected:
        raise ValueError(f"last_logits has shape {tuple(last_logits.shape)}, expected (batch, vocab) = {expected}")
    if last_logits.dtype != model.dtype:
        raise TypeError(f"last_logits has dtype {last_logits.dtype}, expected the model's {model.dtype}")
    if last_logits.device != model.device:
        raise ValueError(f"last_logits is on {last_logits.device} but the model is on {model.device}")
    if first_non_finite({"last_logits": last_logits}) is not None:
        raise ValueError("last_logits holds NaN or infinite values; logits must be finite")


class Session:
    """One stream (batch_size rows that advance together) over `model`, holding its recurrent state."""

    def __init__(
        self,
        model,
        batch_size: int = 1,
        prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE,
        state: State | None = None,
        last_logits: torch.Tensor | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.prefill_chunk_size = check_chunk_size(prefill_chunk_size)
        if state is None:
            state = model.init_state(batch_size)
        else:
            model.check_state(state, batch_size)
            if state.batch_size and bool((state.position != state.position[0]).any()):
                raise ValueError(f"a Session's rows advance together; state positions {state.position.tolist()} differ")
        self.state = state
        self.position = int(state.position[0])  # tokens consumed so far (every row alike)
        # logits after the last consumed token, (B, V); kept so predict() works right after a restore
        check_last_logits(model, last_logits, batch_size)
        self.last_logits = last_logits
        # JSON data an application keeps with the stream (e.g. a chat's messages); saved in the blob, so it is
        # checksummed with the state and restored with it
        self.metadata: dict | None = None

    # ---- streaming ------------------------------------------------------------------------------------
    def push(self, token_ids, keep_logits: bool = True) -> torch.Tensor:
        """Consume tokens; return their logits shaped like the input: int -> (V,), (n,) -> (n, V), (B, n) -> (B, n, V).

        With keep_logits=False only the last token's logits are returned ((V,) or (B, V)), so a long prompt
        does not materialise n x V logits.
        """
        ids, kind = coerce_tokens(self.model, token_ids, self.batch_size)
        logits, self.state = run_tokens(self.model, self.state, ids, self.prefill_chunk_size, keep_logits)
        self.position += ids.shape[1]
        self.last_logits = logits[:, -1]
        if not keep_logits:
            return self.last_logits[0] if self.batch_size == 1 else self.last_logits
        return shape_logits(logits, kind)

    def predict(self, token_ids=None):
        """Greedy next token: push token_ids (if given), then argmax of the last logits (an int for batch 1)."""
        if token_ids is not None:
            self.push(token_ids, keep_logits=False)
        if self.last_logits is None:
            raise RuntimeError("nothing has been pushed yet, so there are no logits to predict from")
        best = self.last_logits.argmax(dim=-1)  # (B,)
        return int(best[0]) if self.batch_size == 1 else best

    def fork(self) -> Session:
        """An independent copy of this stream (the state is cloned; a KV cache is otherwise written in place)."""
        last = None if self.last_logits is None else self.last_logits.clone()
        return Session(self.model, self.batch_size, self.prefill_chunk_size, self.state.clone(), last)

    def nbytes(self) -> int:
        """Bytes the stream's state holds now."""
        return self.state.nbytes()

    def __repr__(self) -> str:
        return (
            f"Session({type(self.model).__name__}, batch_size={self.batch_size}, position={self.position}, "
            f"state={self.nbytes()} bytes)"
        )

    # ---- serialisation --------------------------------------------------------------------------------
    def state_bytes(self, include_weights_hash: bool = True, frozen: dict | None = None) -> bytes:
        """The stream as self-checking bytes (see leanseq.stream.blob); Session.restore reads them back.

        frozen: leanseq.stream.fingerprint(model), computed once by a caller that keeps the model frozen (a server
        saving every stream after every step), instead of a pass over the weights per call."""
        if frozen is not None:
            blobfmt.check_frozen(self.model, frozen)
        info = {"batch_size": self.batch_size, "position": self.position, "prefill_chunk_size": self.prefill_chunk_size}
        if self.metadata is not None:
            info["metadata"] = self.metadata
        return blobfmt.encode(self.model, self.state, self.last_logits, info, include_weights_hash=include_weights_hash,
                              frozen=frozen)

    @classmethod
    def restore(cls, model, blob: bytes, prefill_chunk_size: int | None = None, check_weights: bool = True,
                frozen: dict | None = None) -> Session:
        """A Session continuing exactly where the one that wrote `blob` stood; refuses blobs of other models.

        frozen: leanseq.stream.fingerprint(model) computed once for a model kept frozen (see state_bytes)."""
        if frozen is not None:
            blobfmt.check_frozen(model, frozen)
        state, last_logits, info = blobfmt.decode(model, blob, check_weights=check_weights, frozen=frozen)
        try:
            check_last_logits(model, last_logits, info["batch_size"])
        except (TypeError, ValueError) as exc:
            raise blobfmt.StateBlobError(f"state blob holds invalid logits: {exc}") from exc
        chunk = info["prefill_chunk_size"] if prefill_chunk_size is None else prefill_chunk_size
        session = cls(model, info["batch_size"], chunk, state=state, last_logits=last_logits)
        if session.position != info["position"]:
            raise blobfmt.StateBlobError(
                f"corrupt state blob: header says position {info['position']} but the state holds {session.position}"
            )
        metadata = info.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise blobfmt.StateBlobError(f"corrupt state blob: metadata must be a JSON object, got {type(metadata).__name__}")
        session.metadata = metadata
        return session

    def save(self, path: str | os.PathLike, include_weights_hash: bool = True) -> Path:
        """Write state_bytes() to `path` atomically (temp file, fsync, rename): a crash leaves the old file whole."""
        return blobfmt.write_atomic(path, self.state_bytes(include_weights_hash))

    @classmethod
    def load(cls, model, path: str | os.PathLike, prefill_chunk_size: int | None = None, check_weights: bool = True):
        """Session.restore from a file written by save(); errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved stream state at {path}")
        try:
            return cls.restore(model, blobfmt.read_file(path), prefill_chunk_size, check_weights)
        except blobfmt.StateBlobError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
