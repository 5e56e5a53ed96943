"""An exported model (leanseq export --format onnx) run by onnxruntime on numpy arrays: no PyTorch.

    model = EdgeModel("out/edge-model")                    # checks edge.json and every file's sha256
    state = model.init_state(batch_size=1)                 # {"position", "conv", "ssm"}: numpy arrays
    logits, state = model.step(np.array([42]), state)      # (B,) ids -> (B, V) logits, new state
    logits, state = model.prefill(ids, state)              # (B, n) ids -> next-token logits (B, V), new state

Every file is untrusted until checked: edge.json's fields are validated, each graph's sha256 must match the
one recorded at export, and each graph's inputs and outputs must be the ones edge.json describes. States
passed in are checked (fields, shapes, dtypes, finite values, positions >= 0) before onnxruntime sees them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

MANIFEST = "edge.json"
MANIFEST_FORMAT = "leanseq-edge"
MANIFEST_VERSION = 1
STATE_FIELDS = ("position", "conv", "ssm")
_DTYPES = {"float32": np.float32, "int64": np.int64}
_MAX_MANIFEST_BYTES = 1 << 20


class EdgeModelError(ValueError):
    """An exported model folder is incomplete, corrupt, or not one this runtime reads; the message says which."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict:
    """edge.json of an exported model, validated (types and the fields this runtime relies on)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EdgeModelError(f"{folder} is not an exported leanseq model: it has no {MANIFEST} "
                             "(make one with `leanseq export CHECKPOINT --format onnx --out FOLDER`)")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise EdgeModelError(f"{path} is {path.stat().st_size} bytes, too large for an edge manifest")
    try:
        m = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeModelError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise EdgeModelError(f"{path} is not a leanseq edge manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != MANIFEST_VERSION:
        raise EdgeModelError(f"{path} has manifest version {m.get('version')!r}; this runtime reads version "
                             f"{MANIFEST_VERSION} (export the model again with this leanseq)")

    def need(cond, what):
        if not cond:
            raise EdgeModelError(f"{path} is corrupt: {what}")

    need(isinstance(m.get("vocab_size"), int) and m["vocab_size"] >= 1, "vocab_size must be an integer >= 1")
    need(isinstance(m.get("files"), dict) and all(isinstance(v, str) and len(v) == 64 for v in m["files"].values()),
         "files must map names to sha256 digests")
    need(isinstance(m.get("eos_token_ids"), list) and all(isinstance(i, int) for i in m["eos_token_ids"]),
         "eos_token_ids must be a list of ids")
    prefill = m.get("prefill_chunk")
    need(isinstance(prefill, int) and not isinstance(prefill, bool) and 0 <= prefill <= 4096,
         "prefill_chunk must be an integer in [0, 4096]")
    state = m.get("state")
    need(isinstance(state, dict) and set(state) == set(STATE_FIELDS), f"state must describe {STATE_FIELDS}")
    for name, spec in state.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        need(isinstance(shape, list) and shape.count("batch") == 1
             and all(s == "batch" or (isinstance(s, int) and s >= 1) for s in shape),
             f"state field {name!r} needs a shape of positive sizes with one 'batch'")
        need(spec.get("dtype") in _DTYPES, f"state field {name!r} has dtype {spec.get('dtype')!r}")
    graphs = m.get("graphs")
    need(isinstance(graphs, dict) and "step" in graphs and (("prefill" in graphs) == (prefill > 0)),
         "graphs must hold 'step' (and 'prefill' exactly when prefill_chunk > 0)")
    for name, g in graphs.items():
        need(isinstance(g, dict) and isinstance(g.get("file"), str) and g["file"] in m["files"]
             and "/" not in g["file"] and "\\" not in g["file"] and not g["file"].startswith("."),
             f"graph {name!r} must name a file listed in 'files'")
    for name in m["files"]:
        need("/" not in name and "\\" not in name and not name.startswith("."), f"file name {name!r} is not plain")
    return m


class EdgeModel:
    """An exported Mamba-1 / Mamba-2 model on onnxruntime. Thread count: `threads` (default: onnxruntime's)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, check_files: bool = True):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        if check_files:
            for name, digest in m["files"].items():
                path = self.folder / name
                if not path.is_file():
                    raise EdgeModelError(f"{self.folder} is incomplete: {name} is missing (export it again)")
                if _sha256_file(path) != digest:
                    raise EdgeModelError(f"{path} is corrupt or was replaced: its sha256 differs from the one "
                                         f"{MANIFEST} recorded at export (export the model again)")
        self.vocab_size = int(m["vocab_size"])
        self.model_type = m.get("model_type")
        self.prefill_chunk = int(m["prefill_chunk"])
        self.eos_token_ids = [i for i in m["eos_token_ids"] if 0 <= i < self.vocab_size]
        self.state_layout = {k: (tuple(v["shape"]), np.dtype(_DTYPES[v["dtype"]])) for k, v in m["state"].items()}
        opts = ort.SessionOptions()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {}
        for name, g in m["graphs"].items():
            try:
                sess = ort.InferenceSession(str(self.folder / g["file"]), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's own error types
                raise EdgeModelError(f"onnxruntime cannot load {g['file']}: {exc}") from exc
            first = "token_ids" if name == "step" else "input_ids"
            want_in, want_out = [first, *STATE_FIELDS], ["logits", "new_position", "new_conv", "new_ssm"]
            got_in, got_out = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
            if got_in != want_in or got_out != want_out:
                raise EdgeModelError(f"{g['file']} has inputs {got_in} and outputs {got_out}; expected {want_in} "
                                     f"and {want_out} (not a graph leanseq export wrote)")
            self._sessions[name] = sess
        self.tokenizer = None
        if (self.folder / "tokenizer.json").is_file() or (self.folder / "tokenizer_config.json").is_file():
            # torch-free: json for the byte tokenizer, the `tokenizers` library for a tokenizer.json
            from leanseq.text.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.folder)

    def __repr__(self) -> str:
        return (f"EdgeModel({str(self.folder)!r}, {self.model_type}, vocab={self.vocab_size}, "
                f"prefill_chunk={self.prefill_chunk})")

    # ---- state ------------------------------------------------------------------------------------------------
    def state_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {k: (tuple(batch_size if s == "batch" else s for s in shape), dtype)
                for k, (shape, dtype) in self.state_layout.items()}

    def init_state(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """The state before any token, for batch_size rows."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.state_shapes(batch_size).items()}

    def check_state(self, state, batch_size: int) -> None:
        """Refuse a state that does not fit this model: fields, exact shapes and dtypes, finite values,
        positions >= 0. Raises ValueError naming the field."""
        if not isinstance(state, dict) or set(state) != set(STATE_FIELDS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with fields {list(STATE_FIELDS)} (from init_state), got {got}")
        for name, (shape, dtype) in self.state_shapes(batch_size).items():
            a = state[name]
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
                what = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"state field {name!r} is {what}; expected {dtype} {shape} for {batch_size} rows")
        if (state["position"] < 0).any():
            raise ValueError(f"state field 'position' holds {state['position'].tolist()}; positions must be >= 0")
        for name in ("conv", "ssm"):
            if not np.isfinite(state[name]).all():
                raise ValueError(f"state field {name!r} holds NaN or infinite values; a state must be finite")

    def _ids(self, token_ids, rank: int) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != rank or ids.size == 0:
            want = "(batch,)" if rank == 1 else "(batch, length)"
            raise ValueError(f"token ids must have shape {want} and hold at least one id, got {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids.astype(np.int64, copy=False)

    def _run(self, graph: str, ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        first = "token_ids" if graph == "step" else "input_ids"
        out = self._sessions[graph].run(None, {first: ids, **state})
        return out[0], dict(zip(STATE_FIELDS, out[1:]))

    # ---- running ----------------------------------------------------------------------------------------------
    def step(self, token_ids, state: dict, check: bool = True) -> tuple[np.ndarray, dict]:
        """One token per row: token_ids (B,) -> (logits (B, V) float32, new state). The old state is untouched.
        check=False skips the state check (for a state this model itself returned)."""
        ids = self._ids(token_ids, 1)
        if check:
            self.check_state(state, ids.shape[0])
        return self._run("step", ids, state)

    def prefill(self, token_ids, state: dict, check: bool = True) -> tuple[np.ndarray, dict]:
        """(B, n) ids -> (next-token logits (B, V), state after them): whole prefill_chunk-token chunks through
        the prefill graph, the rest through step."""
        ids = self._ids(token_ids, 2)
        if check:
            self.check_state(state, ids.shape[0])
        n, chunk, logits = ids.shape[1], self.prefill_chunk, None
        start = 0
        if chunk:
            while n - start >= chunk:
                logits, state = self._run("prefill", np.ascontiguousarray(ids[:, start:start + chunk]), state)
                start += chunk
        for t in range(start, n):
            logits, state = self._run("step", np.ascontiguousarray(ids[:, t]), state)
        return logits, state
