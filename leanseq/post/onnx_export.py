"""Export a Mamba-1 or Mamba-2 model to ONNX for the torch-free edge runtime (leanseq.edge).

    export_onnx(model, "out/edge-model", tokenizer=tok)      # step.onnx, prefill.onnx, edge.json (+ tokenizer)

Two graphs, both traced from the model's own code (model.step and model(...)) with the state as explicit
inputs and outputs, so a device streams token by token and can save and restore the state between calls:

    step.onnx     token_ids (B,) int64, position (B,), conv, ssm  ->  logits (B, V), new_position, new_conv, new_ssm
    prefill.onnx  input_ids (B, T) int64, position, conv, ssm     ->  logits (B, V) at the last of the T tokens, new state

The batch B is dynamic; the prefill length T is fixed (`prefill_chunk`): Mamba-1's scan unrolls over the
positions of a chunk, so the graph holds one chunk and the runtime feeds longer prompts chunk by chunk and
the remainder through step. Tracing runs inside `leanseq.ops.exporting()`, where the compiled C kernels and
the value checks step aside (see leanseq.ops.export_mode); nothing else differs from eager PyTorch.

edge.json records what the runtime needs (family, sizes, state layout, special tokens) and the sha256 of each
file; after writing, the graphs are run through onnxruntime against eager PyTorch and the largest logit
difference is recorded there too (the export fails if it exceeds the tolerance).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanseq.ops import exporting
from leanseq.post.exportable import UnsupportedExportError, check_exportable

MANIFEST = "edge.json"
MANIFEST_FORMAT = "leanseq-edge"
MANIFEST_VERSION = 1
STATE_FIELDS = ("position", "conv", "ssm")
STEP_INPUTS = ("token_ids", "position", "conv", "ssm")
PREFILL_INPUTS = ("input_ids", "position", "conv", "ssm")
OUTPUTS = ("logits", "new_position", "new_conv", "new_ssm")
DEFAULT_PREFILL_CHUNK = 64
CHECK_STEPS = 16
OPSET = 17  # the torchscript exporter's opset: onnxruntime >= 1.14 runs it
# onnxruntime and eager PyTorch sum in different orders: float32 logits agree to ~1e-5 of their scale
CHECK_RTOL = 1e-4


class _StepGraph(nn.Module):
    """model.step with the state's tensors as separate inputs and outputs (what an ONNX graph can carry)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token_ids, position, conv, ssm):
        state = self.model.state_class(position=position, conv=conv, ssm=ssm)
        logits, new = self.model.step(token_ids, state)
        return logits, new.position, new.conv, new.ssm


class _PrefillGraph(nn.Module):
    """model(input_ids, state, return_state=True, logits="last"): a chunk in, next-token logits and state out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position, conv, ssm):
        state = self.model.state_class(position=position, conv=conv, ssm=ssm)
        logits, new = self.model(input_ids, state=state, return_state=True, logits="last")
        return logits[:, 0], new.position, new.conv, new.ssm


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_layout(model) -> dict:
    """Each state field's shape (with "batch" where the batch goes) and dtype, for edge.json."""
    out = {}
    for name, spec in model.state_spec(1).items():
        shape = ["batch" if dim == "batch" else int(n) for dim, n in zip(spec.dims, spec.shape)]
        out[name] = {"shape": shape, "dtype": str(spec.dtype).removeprefix("torch.")}
    return out


def _export_graph(graph: nn.Module, args: tuple, names: tuple[str, ...], batch_dims: tuple[int, ...],
                  path: Path) -> None:
    """Trace `graph` on `args` into an ONNX file with a dynamic batch, through torch.onnx's tracing exporter
    (a few seconds; the torch.export-based one, dynamo=True, also exports these graphs but takes ~20x longer)."""
    axes = {name: {dim: "batch"} for name, dim in zip(names + OUTPUTS, batch_dims + (0, 0, 1, 1))}
    with exporting(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape reads, deprecation notes on the exporter
        torch.onnx.export(graph.eval(), args, str(path), dynamo=False, input_names=list(names),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=OPSET)


def _check_against_eager(model, folder: Path, prefill_chunk: int, steps: int = CHECK_STEPS) -> dict:
    """Run the written graphs through onnxruntime beside eager PyTorch (2 rows, random tokens): the largest
    logit difference, and whether it is within CHECK_RTOL of the logits' scale."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    gen = torch.Generator().manual_seed(0)
    batch = 2
    state = model.init_state(batch)
    feeds = {k: v.numpy() for k, v in state.tensors().items()}
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        if prefill_chunk:
            prefill = ort.InferenceSession(str(folder / "prefill.onnx"), opts, providers=["CPUExecutionProvider"])
            ids = torch.randint(0, model.vocab_size, (batch, prefill_chunk), generator=gen)
            ref, state = model(ids, state=state, return_state=True, logits="last")
            out = prefill.run(None, dict(feeds, input_ids=ids.numpy()))
            worst = float(np.abs(out[0] - ref[:, 0].numpy()).max())
            scale = max(scale, float(ref.abs().max()))
            feeds = dict(zip(STATE_FIELDS, out[1:]))
        step = ort.InferenceSession(str(folder / "step.onnx"), opts, providers=["CPUExecutionProvider"])
        for _ in range(steps):
            ids = torch.randint(0, model.vocab_size, (batch,), generator=gen)
            ref, state = model.step(ids, state)
            out = step.run(None, dict(feeds, token_ids=ids.numpy()))
            worst = max(worst, float(np.abs(out[0] - ref.numpy()).max()))
            scale = max(scale, float(ref.abs().max()))
            feeds = dict(zip(STATE_FIELDS, out[1:]))
    return {"rows": batch, "prefill_tokens": prefill_chunk, "steps": steps, "max_abs_logit_diff": worst,
            "max_abs_logit": scale, "rtol": CHECK_RTOL, "passed": worst <= CHECK_RTOL * scale}


def export_onnx(model, out_dir: str | os.PathLike, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                tokenizer=None, progress: bool = True) -> dict:
    """Write step.onnx (and prefill.onnx unless prefill_chunk=0), edge.json and the tokenizer into out_dir.

    The folder appears whole or not at all: everything is written into a scratch sibling first, checked
    against eager PyTorch, then renamed into place (an existing out_dir is replaced). Returns edge.json's
    contents (with the check's figures). Raises UnsupportedExportError (a ValueError) for what cannot export.
    """
    check_exportable(model, "onnx")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or not 0 <= prefill_chunk <= 4096:
        raise ValueError(f"prefill_chunk must be an integer in [0, 4096] (0: no prefill graph), got {prefill_chunk!r}")
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} exists and is not an exported model (no {MANIFEST}); choose another "
                              "--out or remove it")
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if n_bytes > 1_800_000_000:  # protobuf caps one file at 2 GB
            raise UnsupportedExportError(
                f"the weights take {n_bytes / 1e9:.1f} GB, over what one ONNX graph file holds (2 GB); export a "
                "smaller model, or use --format gguf (llama.cpp has no such limit)")
        state = model.init_state(2)
        s = state.tensors()
        timings = {}

        def say(msg):
            if progress:
                print(msg, flush=True)

        t0 = time.perf_counter()
        say("[export] tracing model.step -> step.onnx")
        _export_graph(_StepGraph(model), (torch.zeros(2, dtype=torch.long), s["position"], s["conv"], s["ssm"]),
                      STEP_INPUTS, (0, 0, 1, 1), scratch / "step.onnx")
        timings["step_s"] = round(time.perf_counter() - t0, 2)
        if prefill_chunk:
            t0 = time.perf_counter()
            say(f"[export] tracing model(input_ids, state) over {prefill_chunk}-token chunks -> prefill.onnx")
            ids = torch.zeros(2, prefill_chunk, dtype=torch.long)
            _export_graph(_PrefillGraph(model), (ids, s["position"], s["conv"], s["ssm"]), PREFILL_INPUTS,
                          (0, 0, 1, 1), scratch / "prefill.onnx")
            timings["prefill_s"] = round(time.perf_counter() - t0, 2)
        say("[export] checking the graphs against eager PyTorch in onnxruntime")
        check = _check_against_eager(model, scratch, prefill_chunk)
        if not check["passed"]:
            raise RuntimeError(f"the exported graphs' logits differ from eager PyTorch by {check['max_abs_logit_diff']:.3g} "
                               f"(allowed {CHECK_RTOL:g} x {check['max_abs_logit']:.3g}); please report this model")
        if tokenizer is not None:
            tokenizer.save(scratch)
        from leanseq import __version__

        cfg = model.config
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model_type": cfg.model_type,
            "config": cfg.to_dict(),
            "vocab_size": int(cfg.vocab_size),
            "eos_token_ids": model.eos_token_ids(),
            "bos_token_id": getattr(cfg, "bos_token_id", None),
            "state": state_layout(model),
            "graphs": {"step": {"file": "step.onnx", "inputs": list(STEP_INPUTS), "outputs": list(OUTPUTS)}},
            "prefill_chunk": prefill_chunk,
            "opset": _opset(scratch / "step.onnx"),
            "exporter": "torch.onnx (tracing, dynamo=False)",
            "torch_version": torch.__version__,
            "leanseq_version": __version__,
            "export_seconds": timings,
            "check": check,
        }
        if prefill_chunk:
            manifest["graphs"]["prefill"] = {"file": "prefill.onnx", "inputs": list(PREFILL_INPUTS),
                                             "outputs": list(OUTPUTS)}
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(scratch.iterdir()) if p.is_file()}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for p in scratch.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(scratch, 0o755)  # mkdtemp made it private; an exported model is meant to be copied and read
        if out_dir.exists():  # replace an earlier export: move it aside, then swap in the new one
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(scratch, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, out_dir)
        return manifest
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
