"""What `leanseq export` accepts, checked before any file is written: each refusal says what to do instead."""

from __future__ import annotations

import math

import torch
from torch import nn

FORMATS = ("onnx", "gguf")
EXPORTABLE = ("mamba", "mamba2")  # model_type values both formats export


class UnsupportedExportError(ValueError):
    """This model (family, weights or option) cannot be exported to this format; the message says what to do."""


def check_exportable(model, fmt: str) -> None:
    """Refuse a model `fmt` cannot hold faithfully: another family, non-float32 or quantized weights, wrapped
    layers (an unmerged LoRA adapter), and for GGUF the options llama.cpp's Mamba graphs do not compute."""
    if fmt not in FORMATS:
        raise UnsupportedExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype != torch.float32:
            raise UnsupportedExportError(
                f"cannot export to {fmt}: {name} is {t.dtype}, export needs the float32 model "
                f"(load the checkpoint again without quantizing, or with dtype=torch.float32); "
                + ("quantize the exported graph afterwards with onnxruntime.quantization"
                   if fmt == "onnx" else "quantize the GGUF afterwards with llama-quantize"))
        if t.device.type != "cpu":
            raise UnsupportedExportError(f"cannot export to {fmt}: {name} is on {t.device}; move the model to "
                                         "the CPU first (model.cpu())")
    model_type = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    if model_type not in EXPORTABLE:
        if model_type in ("llama", "leanseq_transformer") and fmt == "onnx":
            hint = ("the transformer baseline's KV cache grows by doubling and is written in place, which this "
                    "recurrent-state graph does not hold; run it with PyTorch (leanseq generate)")
        elif model_type == "llama":
            hint = ("the transformer baseline saves a Llama checkpoint, which llama.cpp's own converter reads: "
                    "python convert_hf_to_gguf.py CHECKPOINT --outtype f32")
        else:
            hint = "run it with PyTorch (leanseq generate) instead"
        raise UnsupportedExportError(
            f"cannot export a {model_type!r} model to {fmt}: only Mamba-1 and Mamba-2 models export here; {hint}")
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__module__.startswith("peft") or (name.endswith(("proj", "lm_head")) and kind is not nn.Linear):
            raise UnsupportedExportError(
                f"cannot export to {fmt}: {name or 'the model'} is a {kind.__name__}, not a plain nn.Linear "
                "(an adapter or quantized layer); merge the adapter into the base weights (merge_and_unload) "
                "or export the float32 model")
    if fmt == "gguf":
        _check_gguf_options(model)


def _check_gguf_options(model) -> None:
    cfg = model.config
    if cfg.model_type == "mamba":
        if not cfg.selective:
            raise UnsupportedExportError(
                "cannot export the LTI (non-selective) Mamba ablation to GGUF: llama.cpp's Mamba graph computes "
                "dt, B and C from x_proj; export it to ONNX (--format onnx) instead")
        if cfg.intermediate_size != 2 * cfg.hidden_size:
            raise UnsupportedExportError(
                f"cannot export to GGUF: intermediate_size {cfg.intermediate_size} != 2 * hidden_size "
                f"{cfg.hidden_size}, and llama.cpp's converter (whose files this format follows) only writes "
                "expand = 2 Mamba models; export it to ONNX instead")
    else:
        lo, hi = cfg.time_step_limit
        if lo > 0 or math.isfinite(hi):
            raise UnsupportedExportError(
                f"cannot export to GGUF: time_step_limit {cfg.time_step_limit} clamps dt, which llama.cpp's "
                "Mamba-2 graph does not do (its logits would differ); export it to ONNX instead")
        if cfg.intermediate_size != cfg.expand * cfg.hidden_size:
            raise UnsupportedExportError("cannot export to GGUF: intermediate_size != expand * hidden_size")
    if cfg.use_bias:
        raise UnsupportedExportError(
            "cannot export to GGUF: use_bias=true (biases on in_proj/out_proj), which llama.cpp's Mamba graphs "
            "do not add; export it to ONNX instead")
