"""A native decode step for Mamba-1 and Mamba-2: the whole model.step (every layer, final norm, LM head) in
one call into compiled C (csrc/decode_step.c), float32 or int8 weights.

How it is used: `model.step` (through `SSMLanguageModel._native_step`) and `SSMLanguageModel._step` call
`try_step(model, token_ids, state)`, which returns None whenever the eager path must run instead: the kernel is
switched off (LEANSEQ_NATIVE=0, read once on first use; `native.set_enabled(False)` or
`set_enabled(False)` here; inside `leanseq.ops.exporting()` or a torch.export trace), there is no compiler, weights or state are not float32 CPU tensors, autograd is
recording and something requires a gradient, or the model has a part this kernel does not know.

The plan. A model's plan is built on its first step: the model's sizes and one pointer per weight. Weights are
not copied: nn.Linear's (out, in) layout already suits matrix-vector products, so the kernel reads the
parameters' own memory, and in-place edits (optimizer steps, `load_state_dict`, `.copy_()`, writes through
`.data[...]`) are seen by the next step with no invalidation. One thing derived from weights is kept: Mamba-1's
A = -exp(A_log) (one exp per (channel, state) per layer, as many as the scan's own), in a per-plan cache beside
a copy of the A_log bytes it came from; the kernel compares A_log with that copy (memcmp) on every step and
recomputes on any difference, so a write by any route (none of which it can be told about) is seen by the next
step. What a plan can get wrong otherwise is only *which* tensors it points at, so before each
step it checks, in a few microseconds, that every module, parameter and buffer of the model is still the same
object at the same address with the same strides (a replaced Linear, a `param.data = other` swap, a view such
as `param.data = param.data.t()` or a `.to()` rebuild the plan).
`model.invalidate_native()` drops the plan explicitly.

State. The kernel reads the old conv and SSM state and writes new tensors, so the caller's state is never
modified (users branch from old states) and nothing is copied twice.
"""

from __future__ import annotations

import array
import ctypes
import math
import operator
import os
import threading
from pathlib import Path

import torch
from torch import nn

from leanseq.ops import native
from leanseq.ops.export_mode import is_exporting

_SOURCE = Path(__file__).parent / "csrc" / "decode_step.c"

# Layout shared with csrc/decode_step.c (enums CFG_*, FP_*, G_*, L_*, S_*); PLAN_VERSION guards mismatches.
PLAN_VERSION = 2
_CFG = ("version", "family", "layers", "hidden", "vocab", "d_inner", "n_state", "rank", "heads", "head_dim",
        "groups", "kernel", "conv_ch", "in_rows", "xp_rows", "flags")
_FP = ("eps", "dt_lo", "dt_hi")
_G = ("embed", "norm_f", "head_w", "head_s", "head_b")
_L = ("norm", "in_w", "in_s", "in_b", "conv_w", "conv_b", "xp_w", "xp_s", "dt_w", "dt_b", "A_log", "D",
      "out_w", "out_s", "out_b", "lti_dt", "lti_B", "lti_C", "gnorm", "A_cache")
FLAG_LTI, FLAG_DTHI, FLAG_DTLO, FLAG_EMBED_I8 = 1, 2, 4, 8
_ERRORS = {1: "plan layout/version", 2: "family", 3: "a size below 1", 4: "inconsistent sizes",
           5: "batch size", 6: "conv state size", 7: "ssm state size", 8: "logits size", 9: "scratch size",
           10: "pointer count", 11: "a token id outside the vocabulary"}

# Tests may force a thread count (None: torch.get_num_threads(), reduced for small work).
THREADS: int | None = None

_lock = threading.Lock()
_lib = None
_reason = "not built yet"
_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Force the native decode step on (True) or off (False); None follows leanseq.ops.native's switch."""
    global _enabled
    _enabled = flag


_env_enabled: bool | None = None  # LEANSEQ_NATIVE, read once on first use (os.environ.get costs ~0.7 us a step)


def enabled() -> bool:
    global _env_enabled
    if is_exporting():  # a graph cannot record a call into C through raw pointers
        return False
    if _enabled is not None:
        return _enabled
    flag = getattr(native, "_enabled", None)  # the scan kernel's switch (native.set_enabled) covers this too
    if flag is not None:
        return flag
    if _env_enabled is None:
        _env_enabled = os.environ.get("LEANSEQ_NATIVE", "1") != "0"
    return _env_enabled


def _declare(lib) -> None:
    """The decode library's signatures; AttributeError when a symbol is missing (the loader then rebuilds)."""
    fn = lib.leanseq_ssm_decode_step
    fn.restype = ctypes.c_int
    # cfg, len, fp, len, ptrs, sizes, len, tokens, B, 8 buffers, threads
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
                   + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 8
                   + [ctypes.c_int64])
    packed = lib.leanseq_ssm_decode_packed
    packed.restype = ctypes.c_int
    packed.argtypes = [ctypes.c_void_p, ctypes.c_int64]  # the same arguments packed into one int64 array
    g = lib.leanseq_gemv
    g.restype = ctypes.c_int
    g.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    tf = lib.leanseq_tf_decode_step
    tf.restype = ctypes.c_int
    # cfg, len, fp, len, ptrs, sizes, len, tokens, B, k, v, capacity, pos, logits, scratch, threads
    tf.argtypes = ([ctypes.c_void_p, ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                   + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                   + [ctypes.c_void_p] * 3 + [ctypes.c_int64])


def library():
    """The compiled library, built on first use; None (and `status()` says why) when it cannot be built."""
    global _lib, _reason
    if _lib is None and _reason == "not built yet":
        with _lock:
            if _lib is None and _reason == "not built yet":
                try:
                    lib, how = native.build_library(_SOURCE, extra_flags=("-pthread",), declare=_declare)
                    _lib = lib
                    _reason = how.replace("compiled kernel", "compiled decode kernel", 1)
                except (RuntimeError, OSError, AttributeError) as exc:
                    _reason = f"native decode unavailable: {exc}"
    return _lib


def status() -> str:
    if not enabled():
        return "disabled (LEANSEQ_NATIVE=0 or set_enabled(False))"
    library()
    return _reason


class Unsupported(Exception):
    """This model (as it is now) cannot take the native step; the message says why."""


def _linear(lin, rows: int, cols: int, what: str):
    """(weight, scale or None, bias or None) of an nn.Linear (float32) or an Int8Linear (int8 + row scales)."""
    if lin is None:
        raise Unsupported(f"{what} is missing")
    qweight = getattr(lin, "qweight", None)
    if qweight is not None:
        w, scale = qweight, lin.scale
        if w.dtype != torch.int8 or scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
            raise Unsupported(f"{what}: int8 weights need int8 (out, in) weights and float32 (out,) scales")
    elif isinstance(lin, nn.Linear):
        w, scale = lin.weight, None
    else:
        raise Unsupported(f"{what} is a {type(lin).__module__}.{type(lin).__qualname__}, not an nn.Linear")
    _need(w, (rows, cols), what + ".weight", w.dtype if scale is not None else torch.float32)
    if lin.bias is not None:
        _need(lin.bias, (rows,), what + ".bias")
    return w, scale, lin.bias


def _need(t, shape, what, dtype=torch.float32):
    if t is None:
        raise Unsupported(f"{what} is missing")
    if t.device.type != "cpu" or t.dtype != dtype:
        raise Unsupported(f"{what} is {t.dtype} on {t.device}; the native step wants {dtype} on the CPU")
    if tuple(t.shape) != tuple(shape):
        raise Unsupported(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise Unsupported(f"{what} is not contiguous")
    return t


def _snapshot(model: nn.Module):
    """Every (container dict, key, object) of the module tree (modules, parameters, buffers); every distinct
    tensor among the objects; their addresses and strides (see Plan.fresh)."""
    edges = tuple((d, key, value) for module in model.modules()
                  for d in (module._modules, module._parameters, module._buffers) for key, value in d.items())
    tensors = tuple({id(v): v for _, _, v in edges if isinstance(v, torch.Tensor)}.values())
    return edges, tensors, _addresses(tensors), _layouts(tensors)


_data_ptr, _stride = torch.Tensor.data_ptr, torch.Tensor.stride
_shape, _dtype = operator.attrgetter("shape"), operator.attrgetter("dtype")


def _addresses(tensors) -> tuple[int, ...]:
    return tuple(map(_data_ptr, tensors))


def _layouts(tensors) -> tuple[tuple, ...]:
    """Strides, shapes and dtypes: a same-address view keeps neither (`.t()`, expand, a narrowed first
    dimension, `.view(torch.int32)` of a frozen weight)."""
    return tuple(map(_stride, tensors)), tuple(map(_shape, tensors)), tuple(map(_dtype, tensors))


_requires_grad = operator.attrgetter("requires_grad")


def _layout_guard(tensors):
    """A C++ check of every tensor's sizes and strides in one call (torch's Dynamo TensorGuards: it also
    compares dtype, device, requires_grad and dispatch keys, so it can only be stricter than _layouts), or
    None where this torch lacks it. ~1.5 us for the demo model's 22 tensors instead of ~5 us for _layouts.
    Plan.fresh falls back to the exact _layouts comparison whenever it says no, so it is never relied on to
    say "changed"; only its "unchanged" is used, and that implies equal sizes and strides."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        guard = TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        ok = guard.check(*tensors) is True
    except Exception:  # noqa: BLE001 - a private API: any failure means "not available"
        return None
    return guard.check if ok else None


def _find_dict_version():
    """A function returning a dict's version tag (PEP 509: it changes with every change to the dict), or None.
    CPython keeps the tag internal; torch's Dynamo exposes it (a private API). It is used only after it proves
    here that it sees insertion, replacement and deletion, so a torch or Python where it means something else
    falls back to the exact comparison."""
    try:
        from torch._C._dynamo.guards import dict_version

        probe = {}
        seen = [dict_version(probe)]
        probe["a"] = 1
        seen.append(dict_version(probe))
        probe["a"] = 2
        seen.append(dict_version(probe))
        del probe["a"]
        seen.append(dict_version(probe))
    except Exception:  # noqa: BLE001 - a private API: any failure means "not available"
        return None
    return dict_version if len(set(seen)) == len(seen) and all(type(v) is int for v in seen) else None


_dict_version = _find_dict_version()


class Plan:
    """Sizes and weight pointers of one model, plus its scratch buffer. Built by `plan_for`."""

    def __init__(self, model):
        # strong references: while the plan lives no object it saw can be freed (nor its id reused)
        self.edges, self.tensors, self.addresses, self.tensor_layouts = _snapshot(model)
        # the module tree's dicts, and their version tags (read before the walk that built `edges`: see fresh)
        self.dicts = tuple({id(d): d for d, _, _ in self.edges}.values())
        self.dict_versions = None
        self.layout_guard = _layout_guard(self.tensors)
        self.error: str | None = None
        try:
            self._build(model)
        except Unsupported as exc:
            self.error = str(exc)

    def fresh(self) -> bool:
        """Whether the model still has exactly the modules and tensors seen at build, each at the same address
        with the same strides and shape: a replaced module, parameter or buffer (`mixer.x_proj = ...`,
        load_state_dict(assign=True), a deleted one) fails the first test; a swapped storage (`p.data = other`,
        `.to()`) the second; a view of the same memory (`p.data = p.data.t()`, an expanded or narrowed view)
        the third (one C++ call, _layout_guard, where torch has it; else, and whenever it says no, compared
        here). Runs before every step, ~4.8 us for the demo model's 51 entries in 24 dicts and 22 tensors.

        The first test is skipped while none of the dicts changed at all since it last passed (their version
        tags, one C call each, where _dict_version is available); any change to any of them (even a harmless
        new key) runs it again, and its pass re-arms the shortcut. Tags are read before the test, so a change
        made meanwhile still shows at the next step."""
        versions = None if _dict_version is None else tuple(map(_dict_version, self.dicts))
        if versions is None or versions != self.dict_versions:
            try:
                for d, key, obj in self.edges:
                    if d[key] is not obj:
                        return False
            except KeyError:
                return False
            self.dict_versions = versions
        tensors = self.tensors
        if _addresses(tensors) != self.addresses:
            return False
        guard = self.layout_guard
        return (guard is not None and guard(*tensors)) or _layouts(tensors) == self.tensor_layouts

    def trainable(self) -> bool:
        """Whether any weight the kernel reads requires a gradient (read live: requires_grad_ may change)."""
        return any(map(_requires_grad, self.keep))

    def _build(self, model) -> None:
        cfg = model.config
        family = {"mamba": 1, "mamba2": 2}.get(cfg.model_type)
        if family is None:
            raise Unsupported(f"no native decode for model_type {cfg.model_type!r}")
        layers = list(model.backbone.layers)
        H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
        K = cfg.conv_kernel
        keep, slots, a_caches = [], [], []

        def ptr(t):
            if t is None:
                return 0
            keep.append(t)
            return t.data_ptr()

        eps = {m.eps for m in [model.backbone.norm_f, *(b.norm for b in layers)]}
        head = _linear(model.lm_head, V, H, "lm_head")
        flags, dt_lo, dt_hi = 0, 0.0, 0.0
        embeddings = model.backbone.embeddings
        if type(embeddings) is nn.Embedding:  # exactly: a wrapper (a LoRA adapter) changes what a row is
            embed = _need(embeddings.weight, (V, H), "backbone.embeddings.weight")
        elif getattr(embeddings, "qweight", None) is not None and embeddings.qweight is head[0] \
                and embeddings.scale is head[1]:
            embed, flags = head[0], FLAG_EMBED_I8  # int8 embeddings shared with the int8 head (quantize_int8)
        else:
            raise Unsupported(f"backbone.embeddings is a {type(embeddings).__name__}; the native step reads an "
                              "nn.Embedding or int8 embeddings shared with an int8 LM head")
        g = {"embed": embed, "norm_f": _need(model.backbone.norm_f.weight, (H,), "backbone.norm_f.weight"),
             "head_w": head[0], "head_s": head[1], "head_b": head[2]}
        slots += [ptr(g[name]) for name in _G]
        if family == 1:
            D, N, R = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
            lti = not cfg.selective
            flags |= FLAG_LTI if lti else 0
            sizes = {"d_inner": D, "n_state": N, "rank": R, "heads": 1, "head_dim": 1, "groups": 1, "conv_ch": D,
                     "in_rows": 2 * D, "xp_rows": 0 if lti else R + 2 * N}
        else:
            D, N, NH, P, G = cfg.intermediate_size, cfg.state_size, cfg.num_heads, cfg.head_dim, cfg.n_groups
            lo, hi = cfg.time_step_limit
            if lo > 0:
                flags, dt_lo = flags | FLAG_DTLO, lo
            if math.isfinite(hi):
                flags, dt_hi = flags | FLAG_DTHI, hi
            sizes = {"d_inner": D, "n_state": N, "rank": 0, "heads": NH, "head_dim": P, "groups": G,
                     "conv_ch": cfg.conv_dim, "in_rows": D + cfg.conv_dim + NH, "xp_rows": 0}
        CC = sizes["conv_ch"]
        for i, block in enumerate(layers):
            m, name = block.mixer, f"backbone.layers.{i}.mixer"
            s = dict.fromkeys(_L)
            s["norm"] = _need(block.norm.weight, (H,), f"backbone.layers.{i}.norm.weight")
            s["in_w"], s["in_s"], s["in_b"] = _linear(m.in_proj, sizes["in_rows"], H, name + ".in_proj")
            s["conv_w"] = _need(m.conv1d.weight, (CC, 1, K), name + ".conv1d.weight")
            if m.conv1d.bias is not None:
                s["conv_b"] = _need(m.conv1d.bias, (CC,), name + ".conv1d.bias")
            s["out_w"], s["out_s"], s["out_b"] = _linear(m.out_proj, H, D, name + ".out_proj")
            if family == 1:
                if flags & FLAG_LTI:
                    s["lti_dt"] = _need(m.dt_lti, (R,), name + ".dt_lti")
                    s["lti_B"] = _need(m.B_lti, (N,), name + ".B_lti")
                    s["lti_C"] = _need(m.C_lti, (N,), name + ".C_lti")
                else:
                    s["xp_w"], s["xp_s"], xp_b = _linear(m.x_proj, R + 2 * N, D, name + ".x_proj")
                    if xp_b is not None:
                        raise Unsupported(f"{name}.x_proj has a bias")
                dt_w, dt_s, s["dt_b"] = _linear(m.dt_proj, D, R, name + ".dt_proj")
                if dt_s is not None:
                    raise Unsupported(f"{name}.dt_proj is quantized; the native step keeps dt_proj float32")
                s["dt_w"] = dt_w
                s["A_log"] = _need(m.A_log, (D, N), name + ".A_log")
                s["D"] = _need(m.D, (D,), name + ".D")
                # the kernel's cache of -exp(A_log) with the A_log bytes it came from (refresh_A in the C file)
                a_cache = torch.zeros(2 * D * N + D, dtype=torch.float32)
                a_caches.append(a_cache)
                s["A_cache"] = a_cache.data_ptr()
            else:
                s["dt_b"] = _need(m.dt_bias, (NH,), name + ".dt_bias")
                s["A_log"] = _need(m.A_log, (NH,), name + ".A_log")
                s["D"] = _need(m.D, (NH,), name + ".D")
                s["gnorm"] = _need(m.norm.weight, (D,), name + ".norm.weight")
                eps.add(m.norm.eps)
            slots += [(s[k] or 0) if k == "A_cache" else ptr(s[k]) for k in _L]
        if len(eps) != 1:
            raise Unsupported(f"the norms use different eps values {sorted(eps)}")
        values = dict(version=PLAN_VERSION, family=family, layers=L, hidden=H, vocab=V, kernel=K, flags=flags,
                      **sizes)
        self.family, self.layers, self.vocab = family, L, V
        self.cfg = torch.tensor([values[k] for k in _CFG], dtype=torch.int64)
        self.fp = torch.tensor([eps.pop(), dt_lo, dt_hi], dtype=torch.float64)
        self.ptrs = torch.tensor(slots, dtype=torch.int64)
        self.keep = keep  # the tensors whose addresses are in ptrs stay alive as long as the plan
        self.a_caches = a_caches  # the kernel's own (not weights: left out of keep)
        self.conv_shape = (L, CC, K - 1)
        self.ssm_row = (D, N) if family == 1 else (sizes["heads"], sizes["head_dim"], N)
        self.per_row = 2 * H + sizes["in_rows"] + CC + sizes["xp_rows"] + D
        self.fixed = D * N if family == 1 else 0
        unique = {id(t): t for t in keep}
        embed_only = 0 if head[0] is embed else embed.numel() * embed.element_size()  # a step reads B rows of the embedding
        self.weight_bytes = sum(t.numel() * t.element_size() for t in unique.values()) - embed_only
        self.scratch = torch.empty(0)
        self.layouts: dict = {}
        self.args_fixed = (self.cfg.data_ptr(), len(_CFG), self.fp.data_ptr(), len(_FP), self.ptrs.data_ptr())

    def threads(self, batch: int) -> int:
        if THREADS is not None:
            return THREADS
        return min(torch.get_num_threads(), self.thread_cap(batch))

    def thread_cap(self, batch: int) -> int:
        # a second thread pays for its barriers (~1 us each, 5 per layer) only when there is real work
        return max(1, int(self.weight_bytes * (1 + batch / 4) // 1_000_000))


def plan_for(model, plan_class=None) -> Plan:
    """The model's current plan, rebuilt when the model's modules or tensors changed since the last one.
    `plan_class` (a Plan subclass) builds plans for other model kinds (decode_transformer.TransformerPlan)."""
    plan = model.__dict__.get("_native_decode_plan")
    if plan is None or not plan.fresh():
        plan = (plan_class or Plan)(model)
        model.__dict__["_native_decode_plan"] = plan
    return plan


def invalidate(model) -> None:
    model.__dict__.pop("_native_decode_plan", None)


def _refuse_shape(t: torch.Tensor, shape, what: str):
    raise ValueError(f"state.{what} has shape {tuple(t.shape)}, but this model's state for {shape[1]} rows is "
                     f"{tuple(shape)}")


def _batch_layout(plan: Plan, batch: int):
    """Per batch size, computed once: expected state shapes, the sizes the C entry checks, the scratch floats,
    the head of the packed argument array (everything up to B) and the most threads the work pays for."""
    L, CC, W = plan.conv_shape
    conv = torch.Size((L, batch, CC, W))
    ssm = torch.Size((L, batch, *plan.ssm_row))
    need = batch * plan.per_row + plan.fixed
    sizes = (ctypes.c_int64 * len(_SIZES))(batch, conv.numel(), ssm.numel(), conv.numel(), ssm.numel(), batch,
                                           batch, batch * plan.vocab, need, plan.ptrs.numel())
    head = (*plan.args_fixed, ctypes.addressof(sizes), len(_SIZES))
    # one C++ check that conv, ssm, position and token ids are exactly what the kernel reads: float32 / int64
    # on the CPU, these shapes, contiguous, no gradient (see _layout_guard; only its "yes" is relied on)
    expected = (torch.empty(conv), torch.empty(ssm), torch.empty(batch, dtype=_I64), torch.empty(batch, dtype=_I64))
    layout = (conv, ssm, sizes, need, head, plan.thread_cap(batch), _layout_guard(expected))
    plan.layouts[batch] = layout
    return layout


_F32, _I64 = torch.float32, torch.int64
_SIZES = ("tokens", "conv_old", "ssm_old", "conv_new", "ssm_new", "pos_old", "pos_new", "logits", "scratch", "ptrs")
_PACKED_LEN = 18  # A_LEN in csrc/decode_step.c
_TOKEN_RANGE = 11


def try_step(model, token_ids: torch.Tensor, state):
    """(logits (B, V), new state) from the native kernel, or None when the eager step must run.

    Token ids are range-checked by the C entry (before it reads anything); an id outside the vocabulary is
    refused with check_input_ids' own ValueError. This runs on every decode step, so it is written for a
    tiny model's ~9 us kernel call: one dict lookup per cached thing, one C++ guard call for the state and ids
    (the itemised checks below run only when it says no), one ctypes argument (a packed array)."""
    if not (enabled() and token_ids.is_cpu):
        return None
    plan = model.__dict__.get("_native_decode_plan")
    if plan is None or not plan.fresh():
        plan = plan_for(model)
    if plan.error is not None or (_lib is None and library() is None):
        return None
    conv, ssm, pos = state.conv, state.ssm, state.position
    if torch.is_grad_enabled() and (conv.requires_grad or ssm.requires_grad or plan.trainable()):
        return None  # autograd wants a graph: the eager ops record one
    batch = token_ids.shape[0]
    conv_shape, ssm_shape, _, need, head, cap, state_guard = plan.layouts.get(batch) or _batch_layout(plan, batch)
    tokens = token_ids
    if state_guard is None or not state_guard(conv, ssm, pos, tokens):  # else all of the below holds already
        if conv.dtype != _F32 or ssm.dtype != _F32 or not (conv.is_cpu and ssm.is_cpu and pos.is_cpu):
            return None  # not float32 CPU state: the eager path handles (or refuses) it
        if conv.shape != conv_shape:
            _refuse_shape(conv, conv_shape, "conv")  # wrong sizes never reach native code
        if ssm.shape != ssm_shape:
            _refuse_shape(ssm, ssm_shape, "ssm")
        if pos.dtype != _I64 or pos.shape != token_ids.shape or token_ids.dtype != _I64:
            return None
        conv, ssm, pos, tokens = conv.contiguous(), ssm.contiguous(), pos.contiguous(), token_ids.contiguous()
    scratch = plan.scratch
    if scratch.numel() < need:
        scratch = plan.scratch = torch.empty(need)
    # empty_like of the contiguous old tensors: the same shapes, and cheaper than torch.empty(shape)
    new_conv, new_ssm, new_pos = torch.empty_like(conv), torch.empty_like(ssm), torch.empty_like(pos)
    logits = torch.empty(batch, plan.vocab)
    threads = THREADS if THREADS is not None else min(torch.get_num_threads(), cap)
    # one int64 array per call (not a shared one: two threads may step models sharing this plan)
    args = array.array("q", (*head, tokens.data_ptr(), batch, conv.data_ptr(), ssm.data_ptr(), new_conv.data_ptr(),
                             new_ssm.data_ptr(), pos.data_ptr(), new_pos.data_ptr(), logits.data_ptr(),
                             scratch.data_ptr(), threads))
    rc = _lib.leanseq_ssm_decode_packed(args.buffer_info()[0], _PACKED_LEN)
    if rc != 0:
        if rc == _TOKEN_RANGE:
            model.check_input_ids(token_ids, rank=1, what="token_ids")  # raises its usual ValueError
        raise RuntimeError(f"native decode step refused its inputs: {_ERRORS.get(rc, rc)} (code {rc})")
    return logits, type(state)(position=new_pos, conv=new_conv, ssm=new_ssm)


def gemv(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None, threads: int = 1) -> torch.Tensor:
    """y = x @ W.T with the kernel's matrix-vector product (for benchmarks and tests): W (out, in) float32 or
    int8 with `scale` (out,); x (B, in) float32."""
    if library() is None:
        raise RuntimeError(status())
    rows, cols = weight.shape
    if x.dim() != 2 or x.shape[1] != cols or x.dtype != torch.float32:
        raise ValueError(f"x must be float32 (B, {cols}), got {x.dtype} {tuple(x.shape)}")
    if (scale is None) != (weight.dtype == torch.float32) or (scale is not None and scale.shape != (rows,)):
        raise ValueError("float32 weights take no scale; int8 weights need float32 scales (out,)")
    weight, x = weight.contiguous(), x.contiguous()
    y = torch.empty(x.shape[0], rows)
    _lib.leanseq_gemv(weight.data_ptr(), None if scale is None else scale.contiguous().data_ptr(), x.data_ptr(),
                      y.data_ptr(), rows, cols, x.shape[0], threads)
    return y
