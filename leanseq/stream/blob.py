"""The byte format of a saved stream, and the model fingerprint that ties it to one model.

Layout (all integers little-endian):

    magic            8 bytes   b"LSQSTATE"
    version          uint32    FORMAT_VERSION
    header_len       uint32
    header           header_len bytes of UTF-8 JSON: model fingerprint, session info, payload_len
    payload          payload_len bytes: safetensors (the state's tensors as "state.<field>", "last_logits")
    checksum         32 bytes: sha256 of everything before it

Reading checks, in order: magic, version, length (truncated?), checksum (corrupt?), fingerprint (another
model?), then the tensors against the model's own init_state. Each failure raises a StateBlobError that
says which check failed. Tensors go through safetensors, so loading a blob never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

from leanseq.models.checkpoint import write_file_atomic as write_atomic  # noqa: F401 - blob.write_atomic, as before

MAGIC = b"LSQSTATE"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header_len
_DIGEST_BYTES = 32
_MAX_HEADER_BYTES = 1 << 20  # a real header is a few hundred bytes; more means a corrupt length field
STATE_PREFIX = "state."
LAST_LOGITS = "last_logits"


class StateBlobError(ValueError):
    """A saved stream is not a leanseq state blob, is truncated or corrupt, or has an unsupported version."""


class StateMismatchError(StateBlobError):
    """A saved stream belongs to another model (type, config or weights differ)."""


# ---- model fingerprint ------------------------------------------------------------------------------------
def config_hash(model) -> str:
    return hashlib.sha256(model.config.to_json().encode()).hexdigest()


def _raw_bytes(name: str, t: torch.Tensor):
    """A tensor's bytes as a buffer for hashlib: contiguous CPU tensors are read in place, without a copy."""
    if t.device.type == "meta":
        raise ValueError(f"cannot fingerprint the model: weight {name!r} is on the meta device (it holds no values)")
    flat = t.detach().cpu().contiguous().reshape(-1)  # each step is a no-op for a contiguous CPU tensor
    return flat.view(torch.uint8).numpy()


def weights_hash(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), computed afresh on every call.

    Not cached, because no cheap key is reliable: writes through `.data` leave the version counter alone, and
    `p.data = p.data.t()` keeps the data pointer, so only the bytes themselves tell that a weight changed.
    The cost is one pass over the weights at sha256 speed (measured ~1.7 GB/s on one core: ~0.3 s for a 130m
    float32 model, 0.15 ms for a tiny one) on each state_bytes() and each restore; callers that cannot afford it pass
    include_weights_hash=False or check_weights=False and take on keeping model and blobs together.
    """
    digest = hashlib.sha256()
    seen: dict[int, str] = {}  # id -> first name: tied weights appear under two names as one Parameter
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if id(t) in seen:
            digest.update(f"alias:{seen[id(t)]}".encode())
            continue
        seen[id(t)] = name
        digest.update(_raw_bytes(name, t))
    return digest.hexdigest()


FINGERPRINT_KEYS = ("model_class", "model_type", "state_class", "config_sha256", "weights_sha256")


def fingerprint(model, include_weights: bool = True) -> dict:
    """What a blob must match to be restored into `model`."""
    return {
        "model_class": type(model).__name__,
        "model_type": str(model.config.model_type),
        "state_class": model.state_class.__name__,
        "config_sha256": config_hash(model),
        "weights_sha256": weights_hash(model) if include_weights else None,
    }


def check_frozen(model, frozen: dict) -> dict:
    """A fingerprint(model) computed once, for a caller that keeps the model's config and weights frozen (a server
    writing a blob per request cannot afford a pass over the weights each time). Checked to be whole and to name
    this model's classes; that the weights did not change since is the caller's promise."""
    if not isinstance(frozen, dict) or set(frozen) != set(FINGERPRINT_KEYS):
        raise ValueError(f"a frozen fingerprint is the dict fingerprint(model) returns, with keys {FINGERPRINT_KEYS}")
    weights = frozen["weights_sha256"]
    if not isinstance(weights, str) or len(weights) != 64 or any(c not in "0123456789abcdef" for c in weights):
        raise ValueError("a frozen fingerprint needs the weights hash: compute it with fingerprint(model)")
    mine = {"model_class": type(model).__name__, "model_type": str(model.config.model_type),
            "state_class": model.state_class.__name__}  # not the config hash: this check runs on every blob
    if any(frozen[k] != mine[k] for k in mine):
        raise ValueError(f"the frozen fingerprint is another model's ({frozen['model_class']}, "
                         f"{frozen['model_type']!r}), not this {mine['model_class']}'s")
    return frozen


def check_fingerprint(model, saved: dict, check_weights: bool = True, frozen: dict | None = None) -> None:
    mine = fingerprint(model, include_weights=False) if frozen is None else frozen
    for key, what in (("model_type", "model_type"), ("model_class", "model class"), ("state_class", "state class")):
        if saved.get(key) != mine[key]:
            raise StateMismatchError(
                f"state blob belongs to another model: it was saved for {what} {saved.get(key)!r}, "
                f"this model is {mine[key]!r}"
            )
    if saved.get("config_sha256") != mine["config_sha256"]:
        raise StateMismatchError(
            f"state blob belongs to another model: same model_type {mine['model_type']!r} but a different config "
            f"(config sha256 {str(saved.get('config_sha256'))[:12]}... vs this model's {mine['config_sha256'][:12]}...)"
        )
    if check_weights and saved.get("weights_sha256") is not None:
        mine_w = weights_hash(model) if frozen is None else frozen["weights_sha256"]
        if saved["weights_sha256"] != mine_w:
            raise StateMismatchError(
                "state blob belongs to another model: same config but different weights "
                f"(weights sha256 {saved['weights_sha256'][:12]}... vs this model's {mine_w[:12]}...); "
                "pass check_weights=False to restore it anyway"
            )


# ---- encode / decode --------------------------------------------------------------------------------------
# dtypes that safetensors writes from a numpy view exactly as from the torch tensor (same tag, same bytes)
_NUMPY_SAVE_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.int64, torch.int32))


def save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of contiguous CPU tensors. Through safetensors.numpy where every dtype allows (the same
    bytes, a quarter of safetensors.torch's Python cost per call: a server checkpoints sessions as it answers
    them), else safetensors.torch (bfloat16 has no numpy dtype)."""
    if all(t.dtype in _NUMPY_SAVE_DTYPES for t in tensors.values()):
        from safetensors.numpy import save

        return save({name: t.numpy() for name, t in tensors.items()})
    from safetensors.torch import save

    return save(tensors)


def encode(model, state, last_logits, session_info: dict, include_weights_hash: bool = True,
           frozen: dict | None = None) -> bytes:
    """The blob's bytes. frozen: fingerprint(model) computed once (see check_frozen), used instead of hashing."""
    tensors = {STATE_PREFIX + name: t.detach().contiguous().cpu() for name, t in state.tensors().items()}
    if last_logits is not None:
        tensors[LAST_LOGITS] = last_logits.detach().contiguous().cpu()
    payload = save_tensors(tensors)
    header = {
        "fingerprint": fingerprint(model, include_weights=include_weights_hash) if frozen is None else
        {**frozen, "weights_sha256": frozen["weights_sha256"] if include_weights_hash else None},
        "session": session_info,
        "payload_len": len(payload),
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def _check_prefix(prefix: bytes, total: int) -> int:
    """Check the magic, version and header length of a blob of `total` bytes that starts with `prefix`.

    prefix is the blob's first _PREFIX.size bytes (fewer when the blob is shorter). Returns header_len.
    """
    if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
        raise StateBlobError(f"state blob is truncated: {total} bytes, too short for even the format magic")
    if prefix[: len(MAGIC)] != MAGIC:
        raise StateBlobError(
            f"not a leanseq stream state: it starts with {prefix[:len(MAGIC)]!r}, expected the magic {MAGIC!r}"
        )
    if len(prefix) < _PREFIX.size:
        raise StateBlobError(f"state blob is truncated: {total} bytes, shorter than its {_PREFIX.size}-byte prefix")
    _, version, header_len = _PREFIX.unpack_from(prefix)
    if version != FORMAT_VERSION:
        newer = " (written by a newer leanseq)" if version > FORMAT_VERSION else ""
        raise StateBlobError(
            f"state blob has format version {version}{newer}; this leanseq reads version {FORMAT_VERSION}"
        )
    if header_len > _MAX_HEADER_BYTES:
        raise StateBlobError(f"state blob is corrupt: its header length field says {header_len} bytes")
    header_end = _PREFIX.size + header_len
    if total < header_end + _DIGEST_BYTES:
        raise StateBlobError(
            f"state blob is truncated: {total} bytes, but its header alone needs {header_end + _DIGEST_BYTES}"
        )
    return header_len


def _check_header(header_bytes: bytes, total: int) -> dict:
    """Parse the JSON header of a blob of `total` bytes and check that it announces exactly that length."""
    try:
        header = json.loads(header_bytes.decode())
        if not isinstance(header, dict):
            raise TypeError(f"header is a {type(header).__name__}, not a JSON object")
        payload_len = int(header["payload_len"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StateBlobError(f"state blob is corrupt: its header cannot be read ({exc})") from exc
    expected = _PREFIX.size + len(header_bytes) + payload_len + _DIGEST_BYTES
    if payload_len < 0:
        raise StateBlobError(f"state blob is corrupt: its header announces a payload of {payload_len} bytes")
    if total < expected:
        raise StateBlobError(f"state blob is truncated: {total} bytes of the {expected} its header announces")
    if total > expected:
        raise StateBlobError(
            f"state blob is corrupt: {total - expected} unexpected bytes after the {expected} its header announces"
        )
    return header


def read_header(blob: bytes) -> tuple[dict, bytes]:
    """Check framing, version, length and checksum; return (header, payload bytes)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"a state blob is bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    header_len = _check_prefix(blob[: _PREFIX.size], len(blob))
    header_end = _PREFIX.size + header_len
    header = _check_header(blob[_PREFIX.size : header_end], len(blob))
    body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise StateBlobError("state blob is corrupt: sha256 checksum mismatch (the bytes changed after saving)")
    return header, body[header_end:]


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of a saved blob file, read whole only after its prefix and header say it is one of exactly
    the file's size: a multi-GB file of something else costs a 16-byte read, not its size in memory."""
    with open(path, "rb") as fh:
        total = os.fstat(fh.fileno()).st_size
        header_len = _check_prefix(fh.read(_PREFIX.size), total)
        _check_header(fh.read(header_len), total)
        fh.seek(0)
        # one byte past the announced size: a file that grew since the checks is then refused by read_header
        return fh.read(total + 1)


def decode(model, blob: bytes, check_weights: bool = True, frozen: dict | None = None):
    """blob -> (state on the model's device, last_logits or None, session info). Raises StateBlobError.

    frozen: fingerprint(model) computed once (see check_frozen), compared instead of hashing the model again."""
    from safetensors.torch import load

    header, payload = read_header(blob)
    check_fingerprint(model, header.get("fingerprint") or {}, check_weights, frozen)
    info = header.get("session") or {}
    for key in ("batch_size", "position", "prefill_chunk_size"):
        if not isinstance(info.get(key), int):
            raise StateBlobError(f"state blob is corrupt: session field {key!r} is missing or not an integer")
    try:
        tensors = load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise StateBlobError(f"state blob is corrupt: its tensors cannot be read ({exc})") from exc
    if info["batch_size"] < 1:
        raise StateBlobError(f"state blob is corrupt: session field 'batch_size' is {info['batch_size']}")
    device = model.device
    last_logits = tensors.pop(LAST_LOGITS, None)
    fields = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    unknown = sorted(k for k in tensors if not k.startswith(STATE_PREFIX))
    expected = model.state_spec(info["batch_size"])
    if unknown or set(fields) != set(expected):
        raise StateBlobError(
            f"state blob does not hold a {model.state_class.__name__}: fields {sorted(fields)}, "
            f"expected {sorted(expected)}" + (f"; unexpected entries {unknown}" if unknown else "")
        )
    # every tensor is checked against the model (full shape, dtype, finite values) before any kernel sees it:
    # a checksum only proves the bytes are the ones written, not that whoever wrote them meant well
    for name, t in fields.items():
        if not expected[name].fits(tuple(t.shape)) or t.dtype != expected[name].dtype:
            raise StateBlobError(
                f"state blob field {name!r} is {t.dtype} {tuple(t.shape)}, which does not fit this model's state "
                f"of {info['batch_size']} rows: expected {expected[name].dtype} {expected[name].describe()}"
            )
    state = model.state_class(**{name: t.to(device) for name, t in fields.items()})
    try:
        model.check_state(state, info["batch_size"], check_values=True)
    except (TypeError, ValueError) as exc:
        raise StateBlobError(f"state blob holds an invalid state: {exc}") from exc
    if last_logits is not None:
        last_logits = last_logits.to(device)
    return state, last_logits, info


