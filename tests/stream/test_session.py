"""Session: pushing tokens one by one, all at once and in any prefill chunking gives the model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanseq.stream import Session

VOCAB = 16  # the conftest models' vocabulary
TOL = {"atol": 2e-5, "rtol": 2e-5}
LENGTH = 19  # not a multiple of any chunk size below, so the last chunk is ragged


def tokens(seed: int = 1, n: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 3, 7, LENGTH])
def test_push_all_at_once_and_one_by_one_equal_forward(model, chunk):
    x = tokens()
    with torch.no_grad():
        reference = model(x[None])[0]  # (L, V), one full forward without a state
    whole = Session(model, prefill_chunk_size=chunk)
    at_once = whole.push(x)
    assert at_once.shape == (LENGTH, VOCAB)
    torch.testing.assert_close(at_once, reference, **TOL)
    assert whole.position == LENGTH

    single = Session(model, prefill_chunk_size=chunk)
    one_by_one = torch.stack([single.push(int(t)) for t in x])  # each an int -> (V,)
    torch.testing.assert_close(one_by_one, reference, **TOL)
    assert single.position == LENGTH

    # mixed pieces: a prompt, a 0-d tensor, a 1-element list, the rest as a numpy array
    mixed = Session(model, prefill_chunk_size=chunk)
    parts = [mixed.push(x[:5]), mixed.push(x[5])[None], mixed.push([int(x[6])]), mixed.push(x[7:].numpy())]
    torch.testing.assert_close(torch.cat(parts), reference, **TOL)
    assert mixed.position == LENGTH


def test_push_continues_and_state_matches_forward(model):
    x = tokens(2)
    with torch.no_grad():
        _, full_state = model(x[None], state=model.init_state(1), return_state=True)
    session = Session(model, prefill_chunk_size=4)
    session.push(x[:9])
    session.push(x[9:])
    for name, t in full_state.tensors().items():
        got = session.state.tensors()[name]
        if name == "position":
            assert torch.equal(got, t)
        elif t.shape == got.shape:
            torch.testing.assert_close(got, t, **TOL)
    assert int(session.state.position[0]) == session.position == LENGTH


def test_predict_is_argmax_of_last_logits(mamba):
    x = tokens(3)
    session = Session(mamba)
    logits = session.push(x)
    first = int(logits[-1].argmax())
    assert session.predict() == first
    assert Session(mamba).predict(x) == first  # push, then predict
    second = session.predict(session.predict())  # greedy decoding: feed the prediction back
    check = Session(mamba)
    check.push(x)
    assert second == int(check.push(first).argmax())
    assert session.position == LENGTH + 1


def test_keep_logits_false_returns_only_last(mamba):
    x = tokens(4)
    full = Session(mamba, prefill_chunk_size=5).push(x)
    last = Session(mamba, prefill_chunk_size=5).push(x, keep_logits=False)
    assert last.shape == (VOCAB,)
    torch.testing.assert_close(last, full[-1], **TOL)


def test_predict_before_any_push_is_an_error(mamba):
    with pytest.raises(RuntimeError, match="nothing has been pushed"):
        Session(mamba).predict()


def test_batched_session_rows_match_separate_sessions(model):
    x = torch.stack([tokens(5), tokens(6), tokens(7)])  # (3, L)
    batched = Session(model, batch_size=3, prefill_chunk_size=4)
    out = batched.push(x[:, :10])
    assert out.shape == (3, 10, VOCAB)
    step = batched.push(x[:, 10])  # (3,) -> one token per row -> (3, V)
    assert step.shape == (3, VOCAB)
    rest = batched.push(x[:, 11:])
    got = torch.cat([out, step[:, None], rest], dim=1)
    for row in range(3):
        alone = Session(model, prefill_chunk_size=4).push(x[row])
        torch.testing.assert_close(got[row], alone, **TOL)
    assert isinstance(batched.predict(), torch.Tensor) and batched.predict().shape == (3,)


def test_fork_is_independent(model):
    x = tokens(8)
    session = Session(model)
    session.push(x[:10])
    fork = session.fork()
    a = session.push(x[10:])
    fork.push(torch.tensor([0, 1, 2]))  # diverge: must not disturb the original's state
    b = fork.fork()
    again = Session(model)
    again.push(x[:10])
    torch.testing.assert_close(a, again.push(x[10:]), **TOL)
    assert b.position == 13 and session.position == LENGTH


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (VOCAB, ValueError, f"token id {VOCAB}, outside the vocabulary"),
        (-1, ValueError, "token id -1, outside the vocabulary"),
        ([1, 2, VOCAB + 5], ValueError, "outside the vocabulary"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (2.0, TypeError, "float"),
        (True, TypeError, "bool"),
        ([], ValueError, "empty"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "0-d, 1-d or 2-d"),
        ("abc", TypeError, "token"),
    ],
)
def test_bad_tokens_are_refused_and_state_is_untouched(mamba, bad, error, message):
    session = Session(mamba)
    session.push([1, 2, 3])
    before = session.state.clone()
    with pytest.raises(error, match=message):
        session.push(bad)
    assert session.position == 3
    for name, t in before.tensors().items():
        assert torch.equal(t, session.state.tensors()[name])


def test_batched_session_refuses_mis_shaped_tokens(mamba):
    session = Session(mamba, batch_size=2)
    with pytest.raises(ValueError, match="one token was given but the session has 2 rows"):
        session.push(3)
    with pytest.raises(ValueError, match=r"do not fit a session of 2 rows"):
        session.push(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="has 3 rows but the session has 2"):
        session.push(torch.zeros(3, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_options_are_refused(mamba, bad):
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        Session(mamba, prefill_chunk_size=bad)
    with pytest.raises(ValueError, match="batch_size"):
        Session(mamba, batch_size=bad)


def test_numpy_integer_scalars_are_tokens(mamba):
    a, b = Session(mamba), Session(mamba)
    torch.testing.assert_close(a.push(np.int64(5)), b.push(5), atol=0, rtol=0)


def test_session_runs_without_autograd(mamba):
    out = Session(mamba).push(tokens(9))
    assert not out.requires_grad


def test_state_with_unequal_positions_is_refused(mamba):
    state = mamba.init_state(2)
    state.position[1] = 4
    with pytest.raises(ValueError, match="rows advance together"):
        Session(mamba, batch_size=2, state=state)
