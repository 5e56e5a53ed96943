"""The explicit recurrent state every leanseq model passes around.

A state is a dataclass whose tensor fields all hold the batch on dimension 1 (dimension 0 is the layer),
plus an integer position tensor of shape (B,) counting the tokens each row has consumed. Keeping one layout
for every model lets streams be saved, restored, batched together and split apart by generic code.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

from leanseq.ops.export_mode import is_exporting

BATCH_DIM = 1


class TensorSpec(NamedTuple):  # a tuple: built on every step, and cheaper than a dataclass
    """What one state tensor must be: its full shape (None: any size, such as a KV cache's capacity), the
    names of its dimensions (for error messages) and its dtype."""

    shape: tuple[int | None, ...]
    dims: tuple[str, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        sizes = ", ".join("*" if n is None else str(n) for n in self.shape)
        return f"({', '.join(self.dims)}) = ({sizes}{',' if len(self.shape) == 1 else ''})"

    def fits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(e is None or e == n for e, n in zip(self.shape, shape))


@dataclasses.dataclass
class State:
    """Base class: subclasses add tensor fields shaped (n_layers, B, ...)."""

    position: torch.Tensor  # (B,) int64, tokens consumed so far per row

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensor fields by name (position included)."""
        names, get = _fields_of(type(self))
        return dict(zip(names, get(self)))

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    def nbytes(self) -> int:
        """Bytes held by this state's tensors (what a stream costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # ---- trust: which states may skip the finiteness check -------------------------------------------------
    # A model vouches for the states it returns, and check_state for those whose values it checked. The mark
    # holds the exact tensor objects (weakly) and their version counters, so it lapses when a field is
    # replaced or written in place; shapes, dtypes and devices are checked on every call regardless.
    # Inference-mode tensors have no version counter: for them only replacement is noticed.
    # The mark is a tuple of weak references and one of versions (built and compared with C-level map/zip: a
    # decode step of a tiny model is a few tens of microseconds, so this check must cost well under one).
    def _trust(self) -> None:
        tensors = _fields_of(type(self))[1](self)
        self._trusted_tensors = tuple(map(weakref.ref, tensors))
        self._trusted_versions = _versions(tensors)

    def _vouch(self, model, placement: tuple | None = None) -> None:
        """Mark this state as `model`'s own output: while none of its tensors changes and the model keeps its
        dtype and device, check_state may skip it altogether (a decode step is then not taxed by the check).
        `placement`: the model's (dtype, device) when the caller already has it (model.step reads it once)."""
        self._trust()
        self._vouched_by = (weakref.ref(model), _placement(model) if placement is None else placement)

    def _vouched_for(self, model, placement: tuple | None = None) -> bool:
        mark = getattr(self, "_vouched_by", None)
        return (mark is not None and mark[0]() is model
                and mark[1] == (_placement(model) if placement is None else placement) and self._is_trusted())

    def _is_trusted(self) -> bool:
        refs = getattr(self, "_trusted_tensors", None)
        if refs is None:
            return False
        try:
            tensors = _fields_of(type(self))[1](self)
        except AttributeError:  # a field deleted
            return False
        if len(refs) != len(tensors):
            return False
        for ref, t in zip(refs, tensors):
            if ref() is not t:
                return False
        versions = self._trusted_versions
        if None in versions:  # an inference tensor among them (they have no version counter)
            return _versions(tensors) == versions
        # the same objects as when trusted, none an inference tensor then, so none now: read the counters directly
        return tuple(map(_get_version, tensors)) == versions

    def _map(self, fn_layered, fn_position) -> State:
        out = {}
        for name, t in self.tensors().items():
            out[name] = fn_position(t) if name == "position" else fn_layered(t)
        out = type(self)(**out)
        if self._is_trusted():  # a copy, view or subset of vouched-for values
            out._trust()
        return out

    def clone(self) -> State:
        return self._map(lambda t: t.clone(), lambda t: t.clone())

    def detach(self) -> State:
        return self._map(lambda t: t.detach(), lambda t: t.detach())

    def to(self, device=None) -> State:
        return self._map(lambda t: t.to(device), lambda t: t.to(device))

    def select(self, index) -> State:
        """Rows `index` (a list or LongTensor of batch rows) as a new state."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.position.device)
        return self._map(lambda t: t.index_select(BATCH_DIM, idx), lambda t: t.index_select(0, idx))

    @classmethod
    def concat(cls, states: list[State]) -> State:
        """Stack several states' rows into one batch (the inverse of `select`)."""
        if not states:
            raise ValueError("concat needs at least one state")
        kinds = {type(s) for s in states}
        if len(kinds) != 1:
            raise TypeError(f"cannot concatenate states of different kinds: {sorted(k.__name__ for k in kinds)}")
        first = states[0]
        out = {}
        for name in first.tensors():
            parts = [getattr(s, name) for s in states]
            out[name] = torch.cat(parts, dim=0 if name == "position" else BATCH_DIM)
        joined = type(first)(**out)
        if all(s._is_trusted() for s in states):
            joined._trust()
        return joined


def _placement(model) -> tuple:
    """(dtype, device) of a model's weights; models may offer a cheaper `_placement()` than the two properties."""
    fast = getattr(model, "_placement", None)
    return fast() if fast is not None else (model.dtype, model.device)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


_get_version = operator.attrgetter("_version")


def _versions(tensors) -> tuple[int | None, ...]:
    # Inference tensors have no version counter, and reading one raises a c10::Error, which records a C++
    # backtrace (~20 us: a whole tiny decode step). Outside inference mode (where a step's new tensors are
    # never inference tensors) the counters are read at once, and the error is only a fallback; inside it,
    # each tensor is asked first.
    if not torch.is_inference_mode_enabled():
        try:
            return tuple(map(_get_version, tensors))
        except RuntimeError:  # an inference tensor made earlier, inside inference mode
            pass
    return tuple(map(_version, tensors))


_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[object], tuple]]] = {}


def _fields_of(cls: type) -> tuple[tuple[str, ...], Callable[[object], tuple]]:
    """A state class's field names and a getter of their values as one tuple (computed once per class:
    dataclasses.fields costs a couple of microseconds per call)."""
    got = _FIELDS.get(cls)
    if got is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        get = operator.attrgetter(*names)
        got = _FIELDS[cls] = (names, get if len(names) > 1 else lambda obj: (get(obj),))
    return got


def _is_overlapping(t: torch.Tensor) -> bool:
    """True for an expanded (broadcast) view: several elements share one memory location."""
    strides = t.stride()
    return 0 in strides and any(stride == 0 and size > 1 for stride, size in zip(strides, t.shape))


def validate_state(
    state, state_class: type[State], specs: dict[str, TensorSpec], device: torch.device, check_values: bool | None
) -> None:
    """Refuse a state that does not fit: its class, every field's type, full shape, dtype, layout and device,
    position >= 0, and (see check_values) finite floating values. Errors name the tensor, what was expected
    and what was found. check_values: True always checks values, False never, None unless the state is one a
    model returned (or that passed this check) and none of its tensors changed since.

    This is the gate before any kernel: a tensor of the right rank and batch but other per-row sizes would
    make the compiled scan read and write past its buffers.
    """
    if not isinstance(state, state_class):
        raise TypeError(
            f"state must be a {state_class.__name__} from this model's init_state(), got {type(state).__name__}"
        )
    names = [f.name for f in dataclasses.fields(state)]
    if set(names) != set(specs):
        raise TypeError(f"state {type(state).__name__} has fields {sorted(names)}, this model expects {sorted(specs)}")
    for name, spec in specs.items():
        t = getattr(state, name, None)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if not spec.fits(tuple(t.shape)):
            raise ValueError(f"state tensor {name!r} has shape {tuple(t.shape)}, expected {spec.describe()}")
        if t.dtype != spec.dtype:
            raise TypeError(
                f"state tensor {name!r} has dtype {t.dtype}, expected {spec.dtype} (the model's); init a new state"
            )
        if t.layout != torch.strided or _is_overlapping(t):
            raise ValueError(
                f"state tensor {name!r} must be a dense tensor owning its memory, got a "
                f"{'sparse' if t.layout != torch.strided else 'broadcast (expanded)'} tensor; pass t.contiguous()"
            )
        if t.device != device:
            raise ValueError(f"state tensor {name!r} is on {t.device} but the model is on {device}")
    if is_exporting():  # values are the runtime's inputs, not known while a graph is recorded
        return
    position = state.position
    if position.numel() and int(position.min()) < 0:
        raise ValueError(f"state tensor 'position' holds {position.tolist()}; positions must be >= 0")
    if check_values is False or (check_values is None and state._is_trusted()):
        return
    bad = first_non_finite({name: getattr(state, name) for name in specs})
    if bad is not None:
        raise ValueError(f"state tensor {bad!r} holds NaN or infinite values; a state must be finite")
    state._trust()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, or None.

    One min/max reduction per tensor (both propagate NaN), several times cheaper than isfinite().all(), and
    one device sync for all of them.
    """
    names, finite = [], []
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t.detach())
            names.append(name)
            finite.append(torch.isfinite(lo) & torch.isfinite(hi))
    if not finite or bool(torch.stack(finite).all()):
        return None
    return next(name for name, ok in zip(names, finite) if not bool(ok))
