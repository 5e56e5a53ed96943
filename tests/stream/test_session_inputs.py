"""A Session streams any model that says how to read its inputs (coerce_stream_input) and how wide its outputs
are (output_size), not only token models: e.g. real-valued series (leanseq.series)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class ValuesModel(nn.Module):
    """The least a non-token model needs: (B, L, 2) floats -> (B, L, 3) outputs over a language model's backbone."""

    output_size = 3

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.inp = nn.Linear(2, lm.config.hidden_size)
        self.out = nn.Linear(lm.config.hidden_size, self.output_size)
        self.config, self.state_class = lm.config, lm.state_class

    device = property(lambda self: self.lm.device)
    dtype = property(lambda self: self.lm.dtype)

    def init_state(self, batch_size, device=None):
        return self.lm.init_state(batch_size, device=device)

    def state_spec(self, batch_size):
        return self.lm.state_spec(batch_size)

    def check_state(self, state, batch_size, check_values=None):
        self.lm.check_state(state, batch_size, check_values)

    def coerce_stream_input(self, values, batch_size):
        v = torch.as_tensor(values, dtype=torch.float32)
        if v.dim() == 1:
            return v.reshape(1, 1, 2), "scalar"
        if v.dim() == 2:
            return v[None], "seq"
        raise ValueError(f"values must be (2,) or (n, 2), got {tuple(v.shape)}")

    def forward(self, values, state=None, return_state=False, logits="all"):
        hidden, state = self.lm.forward_hidden(self.inp(values), state=state, return_state=True)
        y = self.out(hidden if logits == "all" else hidden[:, -1:])
        return (y, state) if return_state else y

    def step(self, values_t, state):
        y, state = self.forward(values_t[:, None], state=state, return_state=True)
        return y[:, 0], state


def test_session_streams_a_model_of_real_values(model):
    torch.manual_seed(0)
    values_model = ValuesModel(model).eval()
    x = torch.randn(7, 2)
    with torch.no_grad():
        whole = values_model(x[None])[0]  # (7, 3)
    from leanseq.stream import Session

    session = Session(values_model)
    outs = [session.push(x[:3])] + [session.push(x[t])[None] for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(outs), whole, atol=1e-4, rtol=1e-4)
    restored = Session.restore(values_model, session.state_bytes())
    assert restored.last_logits.shape == (1, 3)  # checked against output_size, not a vocabulary
    torch.testing.assert_close(restored.push(x[0]), session.push(x[0]))
    with pytest.raises(ValueError, match="values must be"):
        session.push(torch.zeros(1, 1, 1, 2))
