"""One stream over an EdgeModel: push tokens, generate text, save and restore the state. numpy only.

    session = EdgeSession(model)
    logits = session.push(prompt_ids)                      # (V,): next-token logits
    text = session.generate("ROMEO:", max_new_tokens=64)   # greedy unless temperature > 0
    session.save("stream.lsqe")                            # atomic, checksummed, tied to this exported model
    again = EdgeSession.load(model, "stream.lsqe")         # continues with identical logits

State file layout (integers little-endian), as leanseq.stream's blobs but with numpy arrays:

    magic       8 bytes   b"LSQEDGE1"
    version     uint32    FORMAT_VERSION
    header_len  uint32
    header      JSON: model fingerprint, session fields, each array's name, dtype, shape, offset, size
    payload     the arrays' bytes, back to back
    checksum    32 bytes: sha256 of everything before it

Reading checks magic, version, lengths, checksum, then the fingerprint (another model is refused), then every
array against the model's state layout (shape, dtype, finite values) before onnxruntime sees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from leanseq.edge.model import STATE_FIELDS, EdgeModel
from leanseq.fileio import write_file_atomic

MAGIC = b"LSQEDGE1"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_MAX_HEADER = 1 << 20
LAST_LOGITS = "last_logits"


class EdgeStateError(ValueError):
    """A saved edge stream is not one, is truncated or corrupt, or belongs to another exported model."""


def model_fingerprint(model: EdgeModel) -> str:
    """sha256 over the exported files' digests (graphs hold the weights): one value per exported model."""
    return hashlib.sha256(json.dumps(model.manifest["files"], sort_keys=True).encode()).hexdigest()


def encode_state(model: EdgeModel, state: dict, last_logits: np.ndarray | None) -> bytes:
    arrays = {name: np.ascontiguousarray(state[name]) for name in STATE_FIELDS}
    if last_logits is not None:
        arrays[LAST_LOGITS] = np.ascontiguousarray(last_logits, dtype=np.float32)
    entries, offset = [], 0
    for name, a in arrays.items():
        entries.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset,
                        "nbytes": a.nbytes})
        offset += a.nbytes
    header = {"fingerprint": model_fingerprint(model), "model_type": model.model_type,
              "batch_size": int(state["position"].shape[0]), "arrays": entries, "payload_len": offset}
    header_bytes = json.dumps(header, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + b"".join(
        a.tobytes() for a in arrays.values())
    return body + hashlib.sha256(body).digest()


def decode_state(model: EdgeModel, blob: bytes) -> tuple[dict, np.ndarray | None]:
    """blob -> (state, last logits or None), every check passed. Raises EdgeStateError naming the failed one."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"an edge state blob is bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if blob[:len(MAGIC)] != MAGIC:
        raise EdgeStateError(f"not a leanseq edge stream state: it starts with {blob[:8]!r}, expected {MAGIC!r}")
    if len(blob) < _PREFIX.size + _DIGEST:
        raise EdgeStateError(f"edge state is truncated: {len(blob)} bytes")
    _, version, header_len = _PREFIX.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise EdgeStateError(f"edge state has format version {version}; this runtime reads {FORMAT_VERSION}")
    if header_len > _MAX_HEADER or len(blob) < _PREFIX.size + header_len + _DIGEST:
        raise EdgeStateError(f"edge state is truncated or corrupt: {len(blob)} bytes, header length {header_len}")
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise EdgeStateError("edge state is corrupt: sha256 checksum mismatch (the bytes changed after saving)")
    try:
        header = json.loads(blob[_PREFIX.size:_PREFIX.size + header_len].decode())
        entries, payload_len, batch = header["arrays"], int(header["payload_len"]), int(header["batch_size"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EdgeStateError(f"edge state is corrupt: its header cannot be read ({exc})") from exc
    if header.get("fingerprint") != model_fingerprint(model):
        raise EdgeStateError(f"edge state belongs to another exported model (saved for a {header.get('model_type')} "
                             f"export with other files); restore it into the model it was saved from")
    payload = blob[_PREFIX.size + header_len:-_DIGEST]
    if len(payload) != payload_len or batch < 1:
        raise EdgeStateError(f"edge state is corrupt: payload of {len(payload)} bytes, header says {payload_len}")
    expected = model.state_shapes(batch)
    expected[LAST_LOGITS] = ((batch, model.vocab_size), np.dtype(np.float32))
    arrays = {}
    for e in entries:
        name = e.get("name") if isinstance(e, dict) else None
        if name not in expected or name in arrays:
            raise EdgeStateError(f"edge state is corrupt: unexpected or repeated array {name!r}")
        shape, dtype = expected[name]
        if e.get("dtype") != dtype.name or tuple(e.get("shape", ())) != shape \
                or e.get("nbytes") != int(np.prod(shape)) * dtype.itemsize:
            raise EdgeStateError(f"edge state array {name!r} is {e.get('dtype')} {e.get('shape')}; this model's "
                                 f"state of {batch} rows needs {dtype.name} {list(shape)}")
        start = e.get("offset")
        if not isinstance(start, int) or start < 0 or start + e["nbytes"] > len(payload):
            raise EdgeStateError(f"edge state is corrupt: array {name!r} lies outside the payload")
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=start).reshape(shape).copy()
    missing = [n for n in STATE_FIELDS if n not in arrays]
    if missing:
        raise EdgeStateError(f"edge state is corrupt: arrays {missing} are missing")
    last = arrays.pop(LAST_LOGITS, None)
    try:
        model.check_state(arrays, batch)
    except ValueError as exc:
        raise EdgeStateError(f"edge state holds an invalid state: {exc}") from exc
    if last is not None and not np.isfinite(last).all():
        raise EdgeStateError("edge state holds non-finite last logits")
    return arrays, last


class EdgeSession:
    """One stream (batch 1) over an EdgeModel. Not thread-safe: one session per stream."""

    def __init__(self, model: EdgeModel, state: dict | None = None, last_logits: np.ndarray | None = None):
        self.model = model
        if state is None:
            state = model.init_state(1)
        else:
            model.check_state(state, 1)
        self.state = state
        self.last_logits = last_logits  # (V,) after the latest token, None before any

    @property
    def position(self) -> int:
        return int(self.state["position"][0])

    def push(self, token_ids) -> np.ndarray:
        """Feed one id or a sequence of ids; returns the next-token logits (V,) after the last of them."""
        ids = np.atleast_1d(np.asarray(token_ids))
        if ids.ndim != 1:
            raise ValueError(f"push takes one id or a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size == 1:
            logits, self.state = self.model.step(ids, self.state, check=False)
        else:
            logits, self.state = self.model.prefill(ids[None], self.state, check=False)
        self.last_logits = logits[0]
        return self.last_logits

    # ---- save / restore ---------------------------------------------------------------------------------------
    def state_bytes(self) -> bytes:
        last = None if self.last_logits is None else self.last_logits[None]
        return encode_state(self.model, self.state, last)

    def save(self, path: str | os.PathLike) -> Path:
        return write_file_atomic(path, self.state_bytes())

    @classmethod
    def restore(cls, model: EdgeModel, blob: bytes) -> EdgeSession:
        state, last = decode_state(model, blob)
        if state["position"].shape[0] != 1:
            raise EdgeStateError(f"edge state holds {state['position'].shape[0]} rows; an EdgeSession has one")
        return cls(model, state, None if last is None else last[0])

    @classmethod
    def load(cls, model: EdgeModel, path: str | os.PathLike) -> EdgeSession:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(_PREFIX.size)
            if head[:len(MAGIC)] != MAGIC:
                raise EdgeStateError(f"{path} is not a leanseq edge stream state (starts with {head[:8]!r})")
            if size > 16 * (1 << 30):
                raise EdgeStateError(f"{path} is {size} bytes, larger than any edge state")
            return cls.restore(model, head + fh.read())

    # ---- generation -------------------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids=None, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield up to max_new_tokens ids after the prompt (or after what the session holds). Greedy unless
        temperature > 0 (then softmax sampling, within the top_k ids when given). Each id is fed back
        before it is yielded, so the state always covers everything produced."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if prompt_ids is not None and len(prompt_ids):
            self.push(prompt_ids)
        if self.last_logits is None:
            raise ValueError("nothing to continue from: pass a prompt (the session holds no tokens yet)")
        rng = np.random.default_rng(seed)
        eos = set(self.model.eos_token_ids) if stop_at_eos else set()
        for _ in range(max_new_tokens):
            token = _sample(self.last_logits, temperature, top_k, rng)
            self.push(token)
            yield token
            if token in eos:
                return

    def generate(self, prompt: str = "", max_new_tokens: int = 64, **kwargs) -> str:
        """The text generated after `prompt` (needs the tokenizer exported beside the model)."""
        return "".join(self.stream_text(prompt, max_new_tokens, **kwargs))

    def stream_text(self, prompt: str = "", max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        tok = self.model.tokenizer
        if tok is None:
            raise ValueError(f"{self.model.folder} has no tokenizer (export it with one, or use generate_ids)")
        decoder = tok.stream_decoder()
        for token in self.generate_ids(tok.encode(prompt) if prompt else None, max_new_tokens, **kwargs):
            if token in self.model.eos_token_ids and kwargs.get("stop_at_eos", True):
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail


def _sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))
