"""The claim: a state-space model streams any length of context in constant memory; a transformer does not."""

from __future__ import annotations

import pytest
import torch

from leanseq.stream import Session
from leanseq.stream.blob import read_header

VOCAB = 16
LONG = 100_000


def tiny_mamba(make_model):
    return make_model("mamba", hidden_size=8, num_hidden_layers=1, state_size=4)


def shapes(session):
    return {name: tuple(t.shape) for name, t in session.state.tensors().items()}


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_ssm_state_size_is_the_same_after_100k_tokens_as_after_one(make_model, kind):
    model = tiny_mamba(make_model) if kind == "mamba" else make_model("mamba2", num_hidden_layers=1)
    stream = torch.randint(0, VOCAB, (LONG,), generator=torch.Generator().manual_seed(0))
    session = Session(model, prefill_chunk_size=10_000)
    session.push(int(stream[0]))
    after_one, shapes_after_one = session.nbytes(), shapes(session)
    # the remaining 99,999 tokens go through the recurrence in order (10,000-token prefill chunks, each one
    # carrying the state of the last); the state is measured after every piece
    for start in range(1, LONG, 20_000):
        last = session.push(stream[start : start + 20_000], keep_logits=False)
        assert session.nbytes() == after_one
        assert shapes(session) == shapes_after_one
    assert session.position == LONG
    assert torch.isfinite(last).all()
    # and token by token through model.step
    for token in stream[:1000].tolist():
        session.push(token)
        assert session.nbytes() == after_one
    assert session.position == LONG + 1000
    # the saved stream's tensors do not grow either (its header only spells out a longer position number)
    fresh = Session(model)
    fresh.push(0)
    payload = lambda sess: len(read_header(sess.state_bytes())[1])
    assert payload(session) == payload(fresh)


def test_mamba_state_size_is_constant_over_100k_single_steps(make_model):
    # 100,000 real recurrent steps, one token each (about 30 s): the state after the last equals in size the
    # state after the first
    model = tiny_mamba(make_model)
    tokens = torch.randint(0, VOCAB, (LONG, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, state = model.step(tokens[0], model.init_state(1))
        after_one = state.nbytes()
        shapes_after_one = {k: tuple(v.shape) for k, v in state.tensors().items()}
        for token in tokens[1:]:
            _, state = model.step(token, state)
    assert int(state.position) == LONG
    assert state.nbytes() == after_one
    assert {k: tuple(v.shape) for k, v in state.tensors().items()} == shapes_after_one
    assert torch.isfinite(state.ssm).all()


def test_transformer_state_grows_with_the_context(make_model):
    model = make_model("transformer", num_hidden_layers=1)
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, float32
    session = Session(model, prefill_chunk_size=256)
    session.push(1)
    sizes = {1: session.nbytes()}
    stream = torch.randint(0, VOCAB, (2047,), generator=torch.Generator().manual_seed(2))
    session.push(stream[:511], keep_logits=False)
    sizes[512] = session.nbytes()
    session.push(stream[511:], keep_logits=False)
    sizes[2048] = session.nbytes()
    assert sizes[1] < sizes[512] < sizes[2048]
    assert sizes[2048] >= 2048 * per_token  # every token seen is kept: memory is linear in the context
