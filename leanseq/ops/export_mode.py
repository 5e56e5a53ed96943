"""The one switch that export flips: `with leanseq.ops.exporting(): torch.onnx.export(...)`.

While it is on (or while torch.export / torch.onnx trace a graph), the model code takes only the plain tensor
path an exporter can record:
- no compiled C kernel (the native scan and the native decode step read raw pointers, which a graph cannot);
- the Mamba-1 chunked scan runs its vectorised intra-chunk prefix scan (no autograd.Function, no Python
  loop over positions);
- input and state checks keep their shape and dtype tests (static, recorded as nothing) but skip the value
  tests that read a tensor into Python (`int(t.min())`, finiteness): inside a graph those would freeze the
  example's values or stop the tracer.
Nothing else changes: the exported graph computes what eager PyTorch computes.
"""

from __future__ import annotations

import contextlib
import threading

from torch.compiler import is_exporting as _torch_is_exporting


class _Depth(threading.local):
    depth = 0  # per thread: another thread's eager steps keep their kernels and checks


_local = _Depth()


def is_exporting() -> bool:
    """True inside `exporting()` or while torch.export traces a graph (torch.onnx.export(dynamo=True) does).
    Read on every decode step, so it is two attribute reads (~0.1 us)."""
    return _local.depth > 0 or _torch_is_exporting()


@contextlib.contextmanager
def exporting():
    """Run the block with export-friendly code paths (see the module docstring); nests, per thread."""
    _local.depth += 1
    try:
        yield
    finally:
        _local.depth -= 1
