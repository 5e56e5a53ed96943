"""SessionPool: many independent streams stepped as one batch.

The pool keeps one batched state with a row per open session. A step over every session runs model.step on
that state directly; a step over some of them selects their rows, steps them, and writes the rows back.
Sessions join (a row is appended) and leave (their row is split off as a standalone Session) at any time,
and rows may sit at different positions: every model's state carries a per-row position.

    pool = SessionPool(model)
    a, b = pool.open(), pool.open()
    pool.push(a, prompt_ids)                 # a prompt is prefilled alone, then the row rejoins the batch
    out = pool.step({a: 5, b: 7})            # {a: (V,) logits, b: (V,) logits} from one batched model.step
    session_a = pool.close(a)                # a standalone Session (save it, restore it, add it back)
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping

import torch

from leanseq.models.state import BATCH_DIM, State
from leanseq.stream import blob as blobfmt
from leanseq.stream.session import (
    DEFAULT_PREFILL_CHUNK_SIZE,
    Session,
    check_chunk_size,
    check_last_logits,
    coerce_tokens,
    run_tokens,
    shape_logits,
)


def _row_dim(name: str) -> int:
    return 0 if name == "position" else BATCH_DIM


class SessionPool:
    def __init__(self, model, prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE):
        self.model = model
        self.prefill_chunk_size = check_chunk_size(prefill_chunk_size)
        self._state: State | None = None  # one row per open session, in the order of self._ids
        self._ids: list[Hashable] = []
        self._row: dict[Hashable, int] = {}
        self._last_logits: dict[Hashable, torch.Tensor | None] = {}
        self._auto_ids = itertools.count()

    # ---- membership -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, session_id) -> bool:
        return session_id in self._row

    @property
    def session_ids(self) -> list:
        return list(self._ids)

    def _check_id(self, session_id) -> int:
        if session_id not in self._row:
            raise KeyError(f"no open session {session_id!r} in this pool (open: {self._ids})")
        return self._row[session_id]

    def _rows(self, session_ids) -> list[int]:
        """The rows of several sessions: one dict lookup each, and _check_id's error for an unknown one."""
        try:
            return [self._row[sid] for sid in session_ids]
        except KeyError:
            return [self._check_id(sid) for sid in session_ids]  # raises, naming the unknown session

    @torch.no_grad()
    def open(self, session_id: Hashable | None = None, session: Session | None = None) -> Hashable:
        """Add a stream: a fresh one, or a copy of `session`'s state (e.g. one restored from bytes). Returns its id."""
        if session_id is None:
            session_id = next(i for i in self._auto_ids if i not in self._row)
        elif session_id in self._row:
            raise KeyError(f"session id {session_id!r} is already open in this pool")
        if session is None:
            row, last = self.model.init_state(1), None
        else:
            if session.model is not self.model:
                raise ValueError("the session runs on another model instance than this pool")
            if session.batch_size != 1:
                raise ValueError(f"a pool row is one stream; the session has {session.batch_size} rows")
            # the session's fields are plain attributes: check them again before they join the batch
            self.model.check_state(session.state, 1)
            check_last_logits(self.model, session.last_logits, 1)
            row = session.state.clone()
            last = None if session.last_logits is None else session.last_logits[0].clone()
        self._state = row if self._state is None else type(row).concat([self._state, row])
        self._ids.append(session_id)
        self._row[session_id] = len(self._ids) - 1
        self._last_logits[session_id] = last
        return session_id

    @torch.no_grad()
    def close(self, session_id) -> Session:
        """Remove a stream from the pool and return it as a standalone Session."""
        row = self._check_id(session_id)
        session = Session(
            self.model, 1, self.prefill_chunk_size, state=self._state.select([row]),
            last_logits=None if self._last_logits[session_id] is None else self._last_logits[session_id][None],
        )
        keep = [r for r in range(len(self._ids)) if r != row]
        self._state = self._state.select(keep) if keep else None
        del self._ids[row], self._last_logits[session_id]
        self._row = {sid: r for r, sid in enumerate(self._ids)}
        return session

    add, remove = open, close

    def session(self, session_id) -> Session:
        """A standalone copy of one stream (the pool keeps its own); e.g. to save it with state_bytes()."""
        row = self._check_id(session_id)
        last = self._last_logits[session_id]
        return Session(
            self.model, 1, self.prefill_chunk_size, state=self._state.select([row]),
            last_logits=None if last is None else last[None].clone(),
        )

    def state_bytes(self, session_id, metadata: dict | None = None, include_weights_hash: bool = True,
                    frozen: dict | None = None) -> bytes:
        """The same bytes as session(session_id) with that metadata, then state_bytes(), without building the
        Session (a server writes every stepped stream after every step). frozen: see Session.state_bytes."""
        row = self._check_id(session_id)
        if frozen is not None:
            blobfmt.check_frozen(self.model, frozen)
        last = self._last_logits[session_id]
        state = self._state.select([row])
        info = {"batch_size": 1, "position": int(state.position[0]), "prefill_chunk_size": self.prefill_chunk_size}
        if metadata is not None:
            info["metadata"] = metadata
        return blobfmt.encode(self.model, state, None if last is None else last[None], info,
                              include_weights_hash=include_weights_hash, frozen=frozen)

    def position(self, session_id) -> int:
        return int(self._state.position[self._check_id(session_id)])

    def positions(self, session_ids) -> list[int]:
        """position() of several sessions, read off the batched state at once."""
        rows = self._rows(session_ids)
        every = self._state.position.tolist()
        return [every[r] for r in rows]

    def last_logits(self, session_id) -> torch.Tensor | None:
        """Logits (V,) after the session's last consumed token, or None before its first."""
        self._check_id(session_id)
        return self._last_logits[session_id]

    def nbytes(self) -> int:
        """Bytes held by the pool's batched state."""
        return 0 if self._state is None else self._state.nbytes()

    # ---- running --------------------------------------------------------------------------------------
    def _write_rows(self, rows: list[int], sub: State) -> None:
        """Put the stepped rows back into the batched state."""
        full, parts = self._state.tensors(), sub.tensors()
        same_layout = all(
            full[n].shape[: _row_dim(n)] + full[n].shape[_row_dim(n) + 1 :]
            == parts[n].shape[: _row_dim(n)] + parts[n].shape[_row_dim(n) + 1 :]
            for n in full
        )
        if same_layout:
            # in place: the pool owns its batched state, nobody else holds these buffers
            vouched = self._state._is_trusted() and sub._is_trusted()
            index = torch.as_tensor(rows, dtype=torch.long, device=self._state.position.device)
            for name, t in full.items():
                t.index_copy_(_row_dim(name), index, parts[name])
            if vouched:  # checked rows written into checked rows: the next step need not re-check the values
                self._state._trust()
            return
        # the stepped rows changed layout (a KV cache grew its capacity): rebuild, stepped rows last
        chosen = set(rows)
        others = [r for r in range(len(self._ids)) if r not in chosen]
        pieces = ([self._state.select(others)] if others else []) + [sub]
        self._state = type(sub).concat(pieces)
        self._ids = [self._ids[r] for r in others] + [self._ids[r] for r in rows]
        self._row = {sid: r for r, sid in enumerate(self._ids)}

    @torch.no_grad()
    def step(self, tokens: Mapping[Hashable, object]) -> dict[Hashable, torch.Tensor]:
        """One token for each given session, run as one batched model.step; returns {session_id: logits (V,)}.

        Sessions left out of `tokens` do not advance.
        """
        if not isinstance(tokens, Mapping):
            raise TypeError(f"step takes a mapping {{session_id: token}}, got {type(tokens).__name__}")
        if not tokens:
            raise ValueError("step needs at least one {session_id: token}")
        ids = list(tokens)
        rows = self._rows(ids)
        token_ids = self._one_each(ids, tokens)  # (n,) token ids, or (n, channels) observations
        if len(rows) == len(self._ids):
            # every session (ids are unique, so every row once): step the batched state as it is, no copies
            index = torch.as_tensor(rows, device=token_ids.device)
            by_row = torch.empty_like(token_ids).index_copy_(0, index, token_ids)
            logits, self._state = self.model.step(by_row, self._state)
            logits = logits.index_select(0, index)  # back into the caller's order
        else:
            logits, sub = self.model.step(token_ids, self._state.select(rows))
            self._write_rows(rows, sub)
        out = dict(zip(ids, logits.unbind(0)))  # one view per row, made in one call
        self._last_logits.update(out)
        return out

    def _one_each(self, ids: list, tokens: Mapping) -> torch.Tensor:
        """One input per session as one tensor: (n,) token ids or, for a model that reads other inputs (a series
        model's observations), (n, ...). Plain ints (a server's usual step) become one tensor checked once; any
        other form goes through coerce_tokens row by row, whose errors name the session."""
        values = [tokens[sid] for sid in ids]
        try:
            whole = self._all_at_once(values)
        except (TypeError, ValueError):
            whole = None  # refused as a whole: coerce each below, whose error then names the session
        if whole is not None:
            return whole
        token_list = []
        for sid, value in zip(ids, values):
            try:
                ids_2d, _kind = coerce_tokens(self.model, value, batch_size=1)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"session {sid!r}: {exc}") from exc
            if ids_2d.shape[1] != 1:  # (1, n) token ids, or (1, n, channels) observations of a series model
                raise ValueError(
                    f"session {sid!r}: step takes one token per session, got {ids_2d.shape[1]}; use push() for a prompt"
                )
            token_list.append(ids_2d[0])
        return torch.cat(token_list)

    def _all_at_once(self, values: list) -> torch.Tensor | None:
        """The usual forms as one tensor, checked once: plain int token ids -> (n,); for a model that reads other
        inputs (a series model), one observation list per session -> (n, ...). None for any other form."""
        coerce = getattr(self.model, "coerce_stream_input", None)
        if coerce is None and all(type(v) is int for v in values):
            token_ids = torch.tensor(values, dtype=torch.long, device=self.model.device)
            self.model.check_input_ids(token_ids, rank=1, what="token ids")
            return token_ids
        if coerce is not None and all(type(v) is list for v in values):  # e.g. one observation per session
            batch, _kind = coerce(torch.tensor(values, dtype=torch.float64), len(values))  # (n, 1, ...)
            if batch.shape[1] == 1:
                return batch[:, 0]
        return None

    @torch.no_grad()
    def push(self, session_id, token_ids, keep_logits: bool = True) -> torch.Tensor:
        """Feed one session a token or a prompt alone (chunked prefill), then its row rejoins the batch.

        Returns logits shaped like Session.push: int -> (V,), (n,) -> (n, V); keep_logits=False -> last (V,).
        """
        row = self._check_id(session_id)
        ids, kind = coerce_tokens(self.model, token_ids, batch_size=1)
        logits, sub = run_tokens(self.model, self._state.select([row]), ids, self.prefill_chunk_size, keep_logits)
        self._write_rows([row], sub)
        self._last_logits[session_id] = logits[0, -1]
        return logits[0, -1] if not keep_logits else shape_logits(logits, kind)

    def predict(self, tokens: Mapping[Hashable, object]) -> dict[Hashable, int]:
        """Greedy next token per session after stepping `tokens`."""
        return {sid: int(lg.argmax()) for sid, lg in self.step(tokens).items()}
