"""Inference matrix products of long inputs through oneDNN, with each weight packed once.

A prefill multiplies hundreds of rows by the same projection weights. On this project's reference CPU (AMD
Zen 4) torch's default float32 route, MKL, takes its AVX2 path and keeps about 70% of two cores busy, while
oneDNN's JIT kernels (the same float32 arithmetic, AVX-512) reach about 88% once the weight sits in
oneDNN's blocked layout (`python benchmarks/vs_llamacpp.py` and docs/vs_llamacpp.md have the figures).

`linear(x, module)` computes `F.linear(x, module.weight, module.bias)`. It takes the oneDNN route only when
all of these hold, and otherwise is exactly F.linear:
- autograd is off (`torch.no_grad()` / inference mode): the packed copy has no gradient;
- the module is a plain float32 `nn.Linear` on the CPU, x is float32 with at least `MIN_ROWS` rows (a decode
  step's single row gains nothing) and no export or trace is recording;
- torch was built with oneDNN (`torch.backends.mkldnn.is_available()`) and `set_enabled(False)` / the
  environment variable LEANSEQ_ONEDNN=0 did not turn the route off.
The packed weight (an extra copy the size of the weight; `release(model)` drops them) is remembered per
module and rebuilt when the weight is replaced or modified in place (its data pointer or version changes).
Results match F.linear to float32 rounding (a different order of the additions), not bit for bit.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
from torch import nn

from leanseq.ops.export_mode import is_exporting

MIN_ROWS = 32  # fewer rows (decode steps, short prompts) stay on F.linear

_enabled: bool | None = None  # None: LEANSEQ_ONEDNN decides, on first use
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight ref, key, packed weight)
_lock = threading.Lock()


def set_enabled(flag: bool | None) -> None:
    """Force the oneDNN route on (True) or off (False); None returns to the LEANSEQ_ONEDNN default."""
    global _enabled
    _enabled = flag


def available() -> bool:
    """Whether this torch build has the oneDNN kernels used here."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("LEANSEQ_ONEDNN", "1").strip() not in ("0", "false", "no", "off") and available()
    return _enabled


def release(model: nn.Module) -> None:
    """Drop the packed copies of `model`'s weights (they are rebuilt on the next long inference input)."""
    with _lock:
        for module in model.modules():
            _packed.pop(module, None)


def _weight_key(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()))


def _packed_weight(module: nn.Linear, rows: int) -> torch.Tensor:
    w = module.weight
    key = _weight_key(w)
    entry = _packed.get(module)
    # the same tensor object (a weak reference: a freed weight's address may be reused by a new one) with the
    # same memory, version and layout
    if entry is not None and entry[0]() is w and entry[1] == key:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows)
    with _lock:
        _packed[module] = (weakref.ref(w), key, packed)
    return packed


def _applies(x: torch.Tensor, module: nn.Module) -> bool:
    if torch.is_grad_enabled() or type(module) is not nn.Linear or not enabled():
        return False
    w = module.weight
    if w.dtype != torch.float32 or x.dtype != torch.float32 or w.device.type != "cpu" or x.device.type != "cpu":
        return False
    if w.is_inference():  # no version counter to notice in-place edits by: the packed copy could go stale
        return False
    if module.bias is not None and module.bias.dtype != torch.float32:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows >= MIN_ROWS and not is_exporting() and not torch.jit.is_tracing() \
        and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """module(x) for an nn.Linear: through oneDNN with a packed weight when that applies (see the module
    docstring), else the module itself. x (..., in_features) -> (..., out_features)."""
    if not _applies(x, module):
        return module(x)
    if x.shape[-1] != module.in_features:  # F.linear's own error, not oneDNN's
        return module(x)
    rows = x.numel() // x.shape[-1]
    packed = _packed_weight(module, rows)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
