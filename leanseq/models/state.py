"""The explicit recurrent state every leanseq model passes around.

A state is a dataclass whose tensor fields all hold the batch on dimension 1 (dimension 0 is the layer),
plus an integer position tensor of shape (B,) counting the tokens each row has consumed. Keeping one layout
for every model lets streams be saved, restored, batched together and split apart by generic code.
"""

from __future__ import annotations

import dataclasses

import torch

BATCH_DIM = 1


@dataclasses.dataclass
class State:
    """Base class: subclasses add tensor fields shaped (n_layers, B, ...)."""

    position: torch.Tensor  # (B,) int64, tokens consumed so far per row

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensor fields by name (position included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    def nbytes(self) -> int:
        """Bytes held by this state's tensors (what a stream costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def _map(self, fn_layered, fn_position) -> State:
        out = {}
        for name, t in self.tensors().items():
            out[name] = fn_position(t) if name == "position" else fn_layered(t)
        return type(self)(**out)

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
        return type(first)(**out)
