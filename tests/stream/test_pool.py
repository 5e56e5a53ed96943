"""SessionPool: each pooled session gets the logits it would get alone, through joins, leaves and prompts."""

from __future__ import annotations

import pytest
import torch

from leanseq.stream import Session, SessionPool

VOCAB = 16
TOL = {"atol": 2e-5, "rtol": 2e-5}


class Mirror:
    """A pool and, for every pooled session, a standalone Session fed the same tokens."""

    def __init__(self, model):
        self.model = model
        self.pool = SessionPool(model, prefill_chunk_size=4)
        self.alone: dict = {}
        self.rng = torch.Generator().manual_seed(0)

    def token(self) -> int:
        return int(torch.randint(0, VOCAB, (1,), generator=self.rng))

    def open(self, session_id=None, session=None):
        sid = self.pool.open(session_id, session=session)
        self.alone[sid] = session.fork() if session is not None else Session(self.model, prefill_chunk_size=4)
        return sid

    def push(self, sid, n):
        x = torch.randint(0, VOCAB, (n,), generator=self.rng)
        torch.testing.assert_close(self.pool.push(sid, x), self.alone[sid].push(x), **TOL)

    def step(self, *sids):
        tokens = {sid: self.token() for sid in sids}
        out = self.pool.step(tokens)
        assert list(out) == list(sids)
        for sid, token in tokens.items():
            torch.testing.assert_close(out[sid], self.alone[sid].push(token), **TOL)
            assert self.pool.position(sid) == self.alone[sid].position

    def close(self, sid):
        session = self.pool.close(sid)
        reference = self.alone.pop(sid)
        assert session.position == reference.position
        x = torch.randint(0, VOCAB, (3,), generator=self.rng)
        torch.testing.assert_close(session.push(x), reference.push(x), **TOL)  # it carries on alone
        return session


def test_pool_equals_sessions_alone_through_joins_and_leaves(model):
    m = Mirror(model)
    a, b = m.open(), m.open()
    m.push(a, 6)  # a prompt prefilled alone; the rows now sit at different positions
    for _ in range(3):
        m.step(a, b)
    c = m.open("c")
    m.step(a, b, c)
    m.step(b)  # a subset advances; the others stay put
    m.step(c, a)  # any order
    m.push(b, 70)  # long enough to grow a KV cache past its first capacity
    m.step(a, b, c)
    left = m.close(b)
    m.step(c, a)
    d = m.open(session=left)  # a closed session rejoins (as a new row)
    m.push(d, 1)
    for _ in range(2):
        m.step(a, c, d)
    m.close(a)
    m.close(c)
    m.step(d)
    assert m.pool.session_ids == [d] and len(m.pool) == 1
    m.close(d)
    assert len(m.pool) == 0 and m.pool.nbytes() == 0
    e = m.open()  # an emptied pool starts over
    m.step(e)


def test_restored_session_joins_a_pool(mamba):
    alone = Session(mamba)
    alone.push(torch.arange(10) % VOCAB)
    restored = Session.restore(mamba, alone.state_bytes())
    pool = SessionPool(mamba)
    other = pool.open()
    sid = pool.open("restored", session=restored)
    assert pool.position(sid) == 10 and pool.position(other) == 0
    torch.testing.assert_close(pool.last_logits(sid), alone.last_logits[0], atol=0, rtol=0)
    out = pool.step({sid: 3, other: 4})
    torch.testing.assert_close(out[sid], alone.push(3), **TOL)
    snapshot = pool.session(sid)  # a copy: stepping it leaves the pool alone
    snapshot.push(5)
    assert pool.position(sid) == 11 and snapshot.position == 12


def test_pool_predict_and_ids(mamba):
    pool = SessionPool(mamba)
    first, second = pool.add(), pool.add()
    assert (first, second) == (0, 1) and second in pool
    logits = pool.step({first: 1, second: 2})
    again = SessionPool(mamba)
    again.add(), again.add()
    assert again.predict({0: 1, 1: 2}) == {k: int(v.argmax()) for k, v in logits.items()}
    pool.remove(first)
    assert pool.add() == 2  # automatic ids only count up: a closed session's id never names a new one


def test_pool_state_is_one_row_per_session(mamba):
    pool = SessionPool(mamba)
    one = mamba.init_state(1).nbytes()
    for _ in range(3):
        pool.open()
    assert pool.nbytes() == 3 * one
    pool.step({0: 1, 1: 1, 2: 1})
    assert pool.nbytes() == 3 * one


def test_pool_errors_name_the_session(mamba):
    pool = SessionPool(mamba)
    a = pool.open("a")
    with pytest.raises(KeyError, match="no open session 'zz'"):
        pool.step({"zz": 1})
    with pytest.raises(KeyError, match="already open"):
        pool.open("a")
    with pytest.raises(ValueError, match="at least one"):
        pool.step({})
    with pytest.raises(TypeError, match="mapping"):
        pool.step([1, 2])
    with pytest.raises(ValueError, match=f"session 'a': token_ids holds token id {VOCAB}, outside the vocabulary"):
        pool.step({a: VOCAB})
    with pytest.raises(ValueError, match="one token per session"):
        pool.step({a: [1, 2]})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pool.push(a, [1, -2])
    assert pool.position(a) == 0  # nothing advanced
    with pytest.raises(ValueError, match="another model instance"):
        pool.open(session=Session(type(mamba)(mamba.config)))
    with pytest.raises(ValueError, match="one stream"):
        pool.open(session=Session(mamba, batch_size=2))
    with pytest.raises(KeyError, match="no open session"):
        pool.close("b")
