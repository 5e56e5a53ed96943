"""The engine: one thread owns the model, a SessionPool of live sessions and the store; requests queue to it.

Each round the engine takes, in arrival order, at most one queued job per session (so one session's requests
are applied in the order they came, never interleaved), runs every single-token step of the round as one
batched SessionPool.step, runs prompts (several tokens) one by one through chunked prefill, writes the state
record of every session the round changed to the store in one transaction, and only then answers the jobs.
A push that was answered is therefore on disk; a server killed at any moment restarts where the last answered
push left each session. The record is a log entry (the tokens fed, a few bytes) and, every `checkpoint_every`
entries of a session (and when it is opened, forked, imported, its chat changes, it leaves memory or the server
stops), a checkpoint: its whole state blob. Loading a session restores its checkpoint and replays its log.

Exactness. On CPU a step's sums can round differently with the batch size: leanseq's native Mamba step takes a
matrix-vector path for one row (rows of batches of 2 and more are identical to each other), and eager steps (a
series model's encoder and head, the transformer) go through the CPU's GEMM, whose rows in batches of 2-3 round
apart from those in batches of 4 and more here. So a stream's outputs would depend on how many others happened to
share its round. A probe at start-up finds the smallest batch size from which a row's bits no longer depend on
the batch (up to 65 rows, the row anywhere in it); a round with fewer rows is stepped beside scratch rows up to
that size, and every stream gets the same bits whatever the traffic: a replayed log gives the very state that was
acknowledged, and a restarted server continues bit for bit (on the same machine, with the same number of torch
threads, which decides how sums are split).

Series models (leanseq.series.SeriesModel) are served by the same engine: a push feeds observations (lists of
`channels` floats, NaN for a missing value, as the model's encoder reads it) instead of token ids, the log holds
them, and an answer holds the model's outputs per observation instead of next tokens.

Sessions not touched for `idle_seconds` (or beyond `max_live` in memory) leave the pool; their state is already
in the store, and the next request loads it back. A stored blob that fails its checks (checksum, model
fingerprint, tensor shapes) is moved to quarantine and reported, never loaded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leanseq.serve.store import LogEntry, Store
from leanseq.stream import Session, SessionPool, StateBlobError
from leanseq.stream.blob import fingerprint

log = logging.getLogger("leanseq.serve")

PAD_IDS = tuple(f"__pad{i}__" for i in range(15))  # scratch rows beside a small round (see the module docstring)
PROBE_FLOORS = (1, 2, 4, 8, 16)
PAD_RESET_STEPS = 4096  # reopen the scratch row now and then (a transformer's cache would otherwise grow)


class ServeError(Exception):
    """An answer for the client: HTTP status, a short code and a message saying what to fix."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def new_session_id() -> str:
    return "s_" + secrets.token_hex(12)


def is_series(model) -> bool:
    """A model that reads real-valued observations (leanseq.series.SeriesModel) rather than token ids: it says how
    to read its stream input (coerce_stream_input) and has `channels` values per observation."""
    return getattr(model, "coerce_stream_input", None) is not None and hasattr(model, "channels")


def pad_input(model):
    """What the scratch row is fed: token 0, or an observation of zeros."""
    return [0.0] * model.channels if is_series(model) else 0


def batch_floor(model) -> int | None:
    """The smallest batch size from which a row's step gives the same bits whatever the batch size and the row's
    place in it (see module docs): 1 when every batch agrees; 2 for leanseq's native Mamba step (a lone row takes
    a matrix-vector path); 4 for eager steps on this CPU's GEMM (rows of 2-3 round apart from 4 and more). None
    when no floor up to 16 holds (then exactness under mixed traffic is not guaranteed)."""
    if is_series(model):
        def row(v):
            return torch.full((1, model.channels), v, dtype=model.dtype)
        probe, filler = row(0.5), [row(v) for v in (-1.25, 2.0, 0.25)]
    else:
        def row(t):
            return torch.tensor([t % model.vocab_size])
        probe, filler = row(1), [row(t) for t in (2, 3, 5)]
    sizes = [*range(1, 18), 31, 32, 33, 64, 65]
    bits = {}
    with torch.no_grad():
        for batch in sizes:  # the probe row in the middle, other inputs around it
            place = batch // 2
            x = torch.cat([probe if i == place else filler[i % len(filler)] for i in range(batch)])
            bits[batch] = model.step(x, model.init_state(batch))[0][place]
    for floor in PROBE_FLOORS:
        if all(torch.equal(bits[floor], bits[b]) for b in sizes if b >= floor):
            return floor
    return None


def is_observation(row, channels: int) -> bool:
    """One stored observation: `channels` floats, finite or NaN (missing)."""
    return isinstance(row, list) and len(row) == channels and \
        all(type(v) is float and not math.isinf(v) for v in row)


def _resolve(jobs: list[Job]) -> None:
    """On the event loop: copy each job's outcome to its asyncio future."""
    for job in jobs:
        waiter = job.waiter[1]
        if waiter.done():  # the request was cancelled (client gone)
            continue
        if job.error is not None:
            waiter.set_exception(job.error)
        else:
            waiter.set_result(job.result)


class TokenSampler:
    """Generation for a model without a tokenizer: RowSampler's choose/accept on token ids, no text."""

    def __init__(self, model, *, temperature=None, top_k=None, top_p=None, seed=None, eos_ids=(),
                 max_new_tokens: int = 16):
        from leanseq.models.generation import check_sampling

        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.eos, self.max_new_tokens = set(eos_ids), max_new_tokens
        self.ids: list[int] = []
        self.done = max_new_tokens == 0
        self.stopped_by = "length" if self.done else None

    def choose(self, logits: torch.Tensor) -> int:
        from leanseq.models.generation import sample_next

        return int(sample_next(logits.detach().float().reshape(1, -1), self.temperature, self.top_k, self.top_p,
                               self.generator)[0])

    def accept(self, token: int) -> str:
        self.ids.append(token)
        if token in self.eos:
            self.done, self.stopped_by = True, "eos"
        elif len(self.ids) >= self.max_new_tokens:
            self.done, self.stopped_by = True, "length"
        return ""


@dataclass(slots=True)
class Job:
    """One request for the engine. Its outcome is `result` or `error` once `finished`; the caller waits on its
    asyncio future (`waiter`, answered with the round's other answers in one wake-up of that loop) or, a caller
    without one (a thread, a test), on the concurrent future that submit() returns. Slotted and without a future
    of its own: one is built per WebSocket message, and a concurrent Future (a Condition and its lock) per push
    was a good part of the event loop's cost per message."""

    kind: str  # open | push | generate | info | delete | fork | export | import
    owner: str
    session_id: str | None = None
    tokens: list | None = None  # token ids, or for a series model observations: lists of `channels` floats
    return_logits: bool = False
    expected_position: int | None = None
    metadata: dict | None = None
    blob: bytes | None = None
    # generation
    make_sampler: Callable | None = None  # prompt ids -> a RowSampler (text) or TokenSampler (token ids)
    sampler: object = None
    emit: Callable[[dict], None] | None = None
    ephemeral: bool = False
    chat_user: list | None = None  # a chat's new messages, rendered after the session's kept history
    render: Callable | None = None  # (messages, add_generation_prompt) -> text, for chat_user
    cancelled: bool = False
    # engine-side progress
    future: concurrent.futures.Future | None = None  # made by submit() for a caller without a waiter
    # (event loop, asyncio future): answered with the round's other answers in one wake-up of that loop
    waiter: tuple | None = None
    delivered: bool = False
    started: bool = False
    pending: tuple | None = None  # (token, text piece) chosen, to be stepped this round
    stepped: list[int] | None = None  # a generation's tokens and text pieces so far
    text: list[str] | None = None
    result: object = None
    error: BaseException | None = None
    finished: bool = False

    def finish(self, result) -> None:
        if self.finished:
            return
        self.result, self.finished = result, True
        if self.future is not None:
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.finished:
            self.error, self.finished = exc, True
            if self.future is not None:
                self.future.set_exception(exc)
        if self.emit is not None:
            self.emit({"error": exc})


class Engine:
    def __init__(self, model, store: Store, *, tokenizer=None, max_sessions_per_key: int = 1000,
                 idle_seconds: float = 300.0, max_live: int = 4096, max_batch: int = 1024,
                 prefill_chunk_size: int = 256, meter=None, start: bool = True, checkpoint_every: int = 64,
                 stagger_checkpoints: bool = True, class_names: list[str] | None = None):
        """start=False: queue jobs first, then start(); the first round then takes them all at once.
        stagger_checkpoints=False: every session checkpoints after exactly checkpoint_every log entries.
        class_names: a series classifier's class names (one per output), answered beside the class indices."""
        if class_names is not None:  # the checks SeriesModel.save and load apply to saved names
            from leanseq.series.encoder import class_names as checked_names

            if not is_series(model):
                raise ValueError("class_names are for a series classifier; this model reads token ids")
            class_names = checked_names(model, {"class_names": class_names}, "class_names")
        self.class_names = class_names
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.store = store
        self.pool = SessionPool(self.model, prefill_chunk_size)
        # the model never changes while serving: fingerprint it once for every blob written and read
        self.frozen = fingerprint(self.model)
        self.series = is_series(self.model)  # observations in, regression / class outputs out
        floor = batch_floor(self.model)
        if floor is None:
            log.warning("this model's step gives other bits at every batch size here: a stream's outputs may "
                        "differ in the last bits with the traffic around it, and a replayed log may not rebuild "
                        "the acknowledged state exactly")
        self.min_batch = floor or 1  # a round of fewer rows is stepped beside scratch rows up to this size
        self.pad_input = pad_input(self.model)
        # the largest observed value a series model takes: beyond it a value becomes infinite in the model's dtype
        self.value_limit = float(torch.finfo(self.model.dtype).max) if self.series else None
        self._pad_steps = 0
        self._evicted_at = 0.0
        self.max_sessions_per_key = max_sessions_per_key
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self.unsaved: dict[str, int] = {}  # live session -> log entries written since its checkpoint
        # a new session's first checkpoint comes after a random share of checkpoint_every: streams that started
        # together (a load test, a fleet of sensors) then checkpoint in different rounds, not all in one
        self._phase: dict[str, int] = {}
        self.stagger_checkpoints = stagger_checkpoints
        self._fed: dict[str, list[LogEntry]] = {}  # this round's pushes, per session, to log
        self._checkpoint_due: set[str] = set()
        self._replaying = False
        self.idle_seconds, self.max_live, self.max_batch = idle_seconds, max_live, max_batch
        self.meta: dict[str, dict] = {}  # live session -> {"owner", "serve": metadata kept in its blob}
        self.last_used: dict[str, float] = {}
        self.owners = store.owners()  # every stored session's owner: sessions per key, visibility
        self.quarantined = {sid for sid, _ in store.quarantined()}
        self.meter = meter
        self.stats = {"rounds": 0, "steps": 0, "tokens_pushed": 0, "tokens_generated": 0, "predictions": 0,
                      "joules": 0.0, "evicted": 0, "loaded": 0, "quarantined": len(self.quarantined),
                      "batch_rows": 0, "checkpoints": 0, "log_entries": 0, "replayed": 0}
        self.energy_method = meter.method if meter is not None else "not metered"
        # submitted jobs: a deque (append and popleft are atomic) and an event set only when the engine may be
        # asleep, rather than a queue.Queue, whose put takes a lock and notifies a Condition on every push
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._pending: list[Job] = []
        self._stopping = threading.Event()
        self._ephemeral_ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="leanseq-serve-engine", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    # ---- the request side (any thread) -------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future | None:
        """Queue a job. A job without a waiter gets a concurrent future, returned here; one with a waiter (an
        asyncio caller) is answered through it, and None is returned."""
        if self._stopping.is_set():
            raise ServeError(503, "shutting_down", "the server is shutting down; retry on another replica")
        if job.waiter is None and job.future is None:
            job.future = concurrent.futures.Future()
        self._queue.append(job)
        if not self._wake.is_set():  # the engine clears it before it looks at an empty queue and sleeps
            self._wake.set()
        return job.future

    def sessions_of(self, owner: str) -> int:
        return sum(1 for o in list(self.owners.values()) if o == owner)

    @property
    def live_sessions(self) -> int:
        return len(self.pool) - sum(p in self.pool for p in PAD_IDS)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued work, write every live session and close the store."""
        self._stopping.set()
        self._queue.append(None)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.store.close()

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        submitted, wake = self._queue, self._wake
        while True:
            if not self._pending and not submitted:
                wake.clear()
                if not submitted:  # a job appended after clear() sets the event again: no lost wake-up
                    wake.wait(1.0)
                if not submitted:
                    self._evict(time.monotonic())
                    continue
            stop = False
            pending = self._pending
            while submitted and len(pending) < self.max_batch:
                job = submitted.popleft()
                if job is None:
                    stop = True
                    break
                pending.append(job)
            if pending:
                self._round()
            now = time.monotonic()
            # idle sessions are looked for at most once a second (every round when idle_seconds is under that):
            # the scan visits every live session, and a busy server runs hundreds of rounds a second
            if now - self._evicted_at >= min(1.0, self.idle_seconds):
                self._evict(now)
            if stop:
                break
        # shutdown: generations still running end here (their states so far are written), queued work is refused
        for job in self._pending:
            job.cancelled = True
        while self._pending:
            self._round()
        self._checkpoint(list(self.unsaved))  # graceful: every live session leaves a checkpoint, no log to replay
        while self._queue:
            job = self._queue.popleft()
            if job is not None:
                job.fail(ServeError(503, "shutting_down", "the server is shutting down"))
                self._deliver([job])

    def _round(self) -> None:
        jobs = list(self._pending)
        try:
            self._round_of(jobs)
            self._deliver(jobs)
        except Exception as exc:  # a bug or a failed store write must not kill the engine or be acknowledged
            log.exception("engine round failed")
            error = ServeError(503, "engine_error", f"the engine failed on this round: {exc}")
            for job in jobs:
                job.fail(error)
                # the state in memory may be ahead of the store: drop it, the next request reloads the stored one
                if job.session_id in self.pool:
                    self._evict_one(job.session_id, save=False)
            for sid in list(self._fed) + list(self._checkpoint_due):
                if sid in self.pool:
                    self._evict_one(sid, save=False)
            self._fed.clear()
            self._checkpoint_due.clear()
            self._pending = []
            self._deliver(jobs)

    @staticmethod
    def _deliver(jobs: list[Job]) -> None:
        """Answer the asyncio waiters of finished jobs: one call_soon_threadsafe per event loop per round, not one
        per job (each is a write to the loop's wake-up pipe)."""
        by_loop: dict = {}
        for job in jobs:
            if job.waiter is not None and job.finished and not job.delivered:
                job.delivered = True
                by_loop.setdefault(job.waiter[0], []).append(job)
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _round_of(self, jobs: list[Job]) -> None:
        taken, rest, seen = [], [], set()
        for job in jobs:
            if job.session_id is not None and job.session_id in seen:
                rest.append(job)
                continue
            if job.session_id is not None:
                seen.add(job.session_id)
            taken.append(job)
        self._pending = rest
        steps: dict[str, int] = {}
        step_jobs: list[Job] = []
        pushes: list[Job] = []  # single-token pushes, stepped together and answered at once
        done: list[Job] = []
        meter = self.meter.measure() if self.meter is not None else None
        window = meter.__enter__() if meter is not None else None
        try:
            for job in taken:
                try:
                    token = self._start(job, done)
                except ServeError as exc:
                    job.fail(exc)
                    if job.ephemeral and job.session_id in self.pool:
                        self._evict_one(job.session_id, save=False)
                    continue
                if token is not None:
                    steps[job.session_id] = token
                    if job.kind == "push":
                        pushes.append(job)
                    else:
                        step_jobs.append(job)
            step_logits, positions = self._step(steps) if steps else ({}, [])
        finally:
            if meter is not None:
                meter.__exit__(None, None, None)
        if window is not None and window.result is not None:
            self.stats["joules"] += window.result.energy_j
            self.meter.measurements.clear()  # the meter keeps every window; a server runs for ever
        self.stats["rounds"] += 1
        self.stats["predictions"] += len(steps)
        self._persist()
        if pushes:
            self._answer_pushes(pushes, step_logits, dict(zip(steps, positions)))
        for job in step_jobs:
            self._after_step(job, step_logits[job.session_id], done)
        for job in done:
            self._finish(job)
        # generations that go on keep their place ahead of later jobs for the same session
        going = [j for j in taken if j.kind == "generate" and not j.finished and j not in done]
        self._pending = going + self._pending

    # one job's part of a round: returns a token to step in the batch, or None when the job ran alone
    def _start(self, job: Job, done: list) -> int | None:
        kind = job.kind
        if kind == "import":
            self._check_quota(job.owner)
            try:
                session = Session.restore(self.model, job.blob, frozen=self.frozen)
            except (StateBlobError, TypeError, ValueError) as exc:
                raise ServeError(400, "invalid_state_blob", f"the state blob was refused: {exc}") from exc
            if session.batch_size != 1:
                raise ServeError(400, "invalid_state_blob", f"a session is one stream; the blob has {session.batch_size}")
            sid = self._add(job.owner, session, {})
            job.result = self._describe(sid)
            done.append(job)
            return None
        if kind == "open":
            self._check_quota(job.owner)
            sid = self._add(job.owner, None, job.metadata or {})
            job.session_id = sid
            job.result = self._describe(sid)
            if job.tokens:
                job.result = self._push_alone(job, sid, job.tokens)
            done.append(job)
            return None
        if kind == "generate" and job.ephemeral and not job.started:
            job.session_id = f"tmp-{next(self._ephemeral_ids)}"
            self.pool.open(job.session_id)
            self.meta[job.session_id] = {"owner": job.owner, "serve": {}, "ephemeral": True}
        sid = job.session_id
        self._load(sid, job.owner)
        self.last_used[sid] = time.monotonic()
        if kind == "info":
            job.result = self._describe(sid)
            done.append(job)
        elif kind == "export":
            job.result = self._blob(sid)
            done.append(job)
        elif kind == "delete":
            self.pool.close(sid)
            self.store.delete(sid)
            for table in (self.meta, self.last_used, self.owners, self.unsaved, self._fed, self._phase):
                table.pop(sid, None)
            self._checkpoint_due.discard(sid)
            job.result = {"id": sid, "object": "session.deleted", "deleted": True}
            done.append(job)
        elif kind == "fork":
            self._check_quota(job.owner)
            twin = self.pool.session(sid)
            new = self._add(job.owner, twin, copy.deepcopy(self.meta[sid]["serve"]))
            job.result = self._describe(new)
            done.append(job)
        elif kind == "push":
            # a position read is a tensor index (microseconds): only when the client asked to check it
            if job.expected_position is not None and job.expected_position != (position := self.pool.position(sid)):
                raise ServeError(409, "position_mismatch",
                                 f"session {sid} is at position {position}, not the expected {job.expected_position} "
                                 "(an earlier push was applied, or another client pushed): GET the session and retry")
            if len(job.tokens) == 1:
                return job.tokens[0]
            job.result = self._push_alone(job, sid, job.tokens)
            done.append(job)
        elif kind == "generate":
            if self.series:
                raise ServeError(400, "not_a_token_model", "this server serves a series model: it answers each "
                                 "pushed observation, it does not generate tokens")
            return self._generate_round(job, done)
        else:  # pragma: no cover (the app builds only the kinds above)
            raise ServeError(400, "bad_job", f"unknown job kind {kind!r}")
        return None

    def _generate_round(self, job: Job, done: list) -> int | None:
        sid = job.session_id
        if job.cancelled:
            done.append(job)
            return None
        if not job.started:
            job.started = True
            job.stepped, job.text = [], []
            if job.chat_user is not None:
                self._chat_begin(job)
            job.sampler = job.make_sampler(list(job.tokens or []))
            if job.tokens:
                logits = self._feed(sid, job.tokens, keep_logits=False)[-1]
                self.stats["tokens_pushed"] += len(job.tokens)
            else:
                logits = self.pool.last_logits(sid)
                if logits is None:
                    raise ServeError(409, "empty_session",
                                     f"session {sid} holds no tokens yet, so there is nothing to continue from: "
                                     "push tokens or give a prompt")
            self._choose(job, logits, done)
            return None
        return job.pending[0] if job.pending is not None else None

    def _choose(self, job: Job, logits, done: list) -> None:
        if job.sampler.done:
            done.append(job)
            return
        token = job.sampler.choose(logits)
        piece = job.sampler.accept(token)
        job.pending = (token, piece)

    def _answer_pushes(self, jobs: list[Job], step_logits: dict, positions: dict) -> None:
        """Answer a round's single-token pushes, read off the batch at once (one argmax; the positions the step
        read for the log) rather than row by row: at a few hundred streams per round the per-row calls added up."""
        outputs = torch.stack([step_logits[job.session_id] for job in jobs])  # (n, V) or (n, out_features)
        best = None if self.series else outputs.argmax(dim=-1).tolist()
        for i, job in enumerate(jobs):
            sid = job.session_id
            job.finish(self._push_result(sid, positions[sid], outputs[i : i + 1], job.return_logits,
                                         next_tokens=None if best is None else [best[i]]))
        self.stats["tokens_pushed"] += len(jobs)

    def _after_step(self, job: Job, logits, done: list) -> None:
        """A generation's step went through: record its token and choose the next (pushes: _answer_pushes)."""
        token, piece = job.pending
        job.pending = None
        job.stepped.append(token)
        job.text.append(piece)
        self.stats["tokens_generated"] += 1
        if job.emit is not None:
            job.emit({"token": token, "text": piece, "position": self.pool.position(job.session_id)})
        self._choose(job, logits, done)

    def _finish(self, job: Job) -> None:
        if job.finished:
            return
        if job.kind == "generate":
            sid = job.session_id
            if job.chat_user is not None and sid in self.meta:
                self._chat_end(job)
            finish = "cancelled" if job.cancelled else ("stop" if job.sampler.stopped_by in ("eos", "stop")
                                                         else "length")
            stepped = job.stepped or []
            job.result = {"id": sid, "tokens": list(stepped), "text": "".join(job.text or ()),
                          "finish_reason": finish, "prompt_tokens": len(job.tokens or []),
                          "completion_tokens": len(stepped), "position": self.pool.position(sid)}
            if job.ephemeral:
                self.pool.close(sid)
                self.meta.pop(sid, None)
                self.last_used.pop(sid, None)
            if job.emit is not None:
                job.emit({"done": job.result})
        job.finish(job.result)

    # ---- chat bookkeeping (kept in the blob's metadata, so it is checksummed and restored with the state) ----
    def _chat_begin(self, job: Job) -> None:
        """The text this turn adds: the whole chat rendered, less what the state already holds (as ChatSession)."""
        chat = self.meta[job.session_id]["serve"].setdefault("chat", {"messages": [], "fed": ""})
        full = job.render([*chat["messages"], *job.chat_user], True)
        same = 0
        for a, b in zip(full, chat["fed"]):
            if a != b:
                break
            same += 1
        delta = full[same:]
        tokens = self.tokenizer.encode(delta)
        if not tokens:
            raise ServeError(400, "empty_turn", "the new messages add no text to the conversation")
        job.tokens = tokens
        chat["messages"].extend(job.chat_user)
        chat["fed"] += delta
        self._checkpoint_due.add(job.session_id)

    def _chat_end(self, job: Job) -> None:
        chat = self.meta[job.session_id]["serve"]["chat"]
        chat["messages"].append({"role": "assistant", "content": "".join(job.text or ())})
        if self.tokenizer is not None and job.stepped:
            chat["fed"] += self.tokenizer.decode(job.stepped, skip_special_tokens=False)
        if not self.meta[job.session_id].get("ephemeral"):
            self._checkpoint_due.add(job.session_id)
            self._persist()

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _check_quota(self, owner: str) -> None:
        if self.sessions_of(owner) >= self.max_sessions_per_key:
            raise ServeError(429, "too_many_sessions",
                             f"this API key holds {self.max_sessions_per_key} sessions, the limit: "
                             "DELETE sessions it no longer needs")

    def _add(self, owner: str, session: Session | None, serve_meta: dict) -> str:
        self._make_room()
        sid = new_session_id()
        self.pool.open(sid, session)
        self.meta[sid] = {"owner": owner, "serve": serve_meta}
        self.last_used[sid] = time.monotonic()
        self.owners[sid] = owner
        self.unsaved[sid] = 0
        if self.stagger_checkpoints:
            self._phase[sid] = secrets.randbelow(self.checkpoint_every)
        self._checkpoint_due.add(sid)
        return sid

    def _load(self, sid: str, owner: str) -> None:
        """Make sure `sid` is live in the pool and belongs to `owner` (else 404: others' sessions do not exist)."""
        if sid in self.meta and sid in self.pool:
            if self.meta[sid]["owner"] != owner:
                raise ServeError(404, "session_not_found", f"no session {sid}")
            return
        if sid in self.quarantined and self.owners.get(sid, owner) == owner:
            raise ServeError(410, "session_quarantined",
                             f"session {sid} had a stored state that failed its checks; it was quarantined")
        stored = self.store.get(sid)
        if stored is None or stored.owner != owner:
            raise ServeError(404, "session_not_found", f"no session {sid}")
        self._make_room()
        try:
            session = Session.restore(self.model, stored.blob, frozen=self.frozen)
            serve_meta = (session.metadata or {}).get("serve", {})
            if not isinstance(serve_meta, dict) or session.batch_size != 1:
                raise StateBlobError("the blob is not a served session's (no serve metadata, or several rows)")
            if session.position != stored.position:
                raise StateBlobError(f"the row says position {stored.position}, its blob {session.position}")
            self.pool.open(sid, session)
            self.meta[sid] = {"owner": owner, "serve": serve_meta}
            self._replay(sid, stored.log)
        except (StateBlobError, TypeError, ValueError) as exc:
            for table in (self.meta, self._fed):
                table.pop(sid, None)
            if sid in self.pool:
                self.pool.close(sid)
            reason = str(exc)
            log.error("session %s: stored state refused and quarantined: %s", sid, reason)
            self.store.quarantine(sid, reason)
            self.quarantined.add(sid)
            self.stats["quarantined"] += 1
            raise ServeError(410, "session_quarantined",
                             f"session {sid}: its stored state failed its checks ({reason}); it was quarantined, "
                             "not loaded") from exc
        self.last_used[sid] = time.monotonic()
        self.unsaved[sid] = len(stored.log)
        self.stats["loaded"] += 1

    def _replay(self, sid: str, entries: list[LogEntry]) -> None:
        """Feed a restored checkpoint the pushes logged after it, exactly as they were first fed."""
        self._replaying = True
        try:
            for entry in entries:
                tokens = entry.tokens
                if self.series:
                    if not isinstance(tokens, list) or not tokens or \
                            not all(is_observation(row, self.model.channels) for row in tokens):
                        raise StateBlobError(f"log entry at position {entry.position} holds no valid observations")
                elif not isinstance(tokens, list) or not tokens or \
                        not all(type(t) is int and 0 <= t < self.model.vocab_size for t in tokens):
                    raise StateBlobError(f"log entry at position {entry.position} holds no valid token ids")
                if entry.position != self.pool.position(sid) + len(tokens):
                    raise StateBlobError(f"log entry ends at position {entry.position} but follows position "
                                         f"{self.pool.position(sid)} with {len(tokens)} tokens: the log has a gap")
                self._feed(sid, tokens, entry.keep_logits)
                self.stats["replayed"] += 1
        finally:
            self._replaying = False

    def _make_room(self) -> None:
        if self.live_sessions < self.max_live:
            return
        busy = {j.session_id for j in self._pending}
        for sid in sorted(self.last_used, key=self.last_used.get):
            if self.live_sessions < self.max_live:
                break
            if sid not in busy and not self.meta.get(sid, {}).get("ephemeral"):
                self._evict_one(sid)

    def _evict(self, now: float) -> None:
        self._evicted_at = now
        busy = {j.session_id for j in self._pending}
        for sid, used in list(self.last_used.items()):
            if now - used > self.idle_seconds and sid not in busy and not self.meta.get(sid, {}).get("ephemeral"):
                self._evict_one(sid)

    def _evict_one(self, sid: str, save: bool = True) -> None:
        # every change was written before it was answered: leaving memory loses nothing; a checkpoint first
        # spares the next load a replay (save=False: the memory state is not trusted, the store's is)
        if save and self.unsaved.get(sid):
            self._checkpoint([sid])
        self.pool.close(sid)
        for table in (self.meta, self.last_used, self.unsaved, self._fed, self._phase):
            table.pop(sid, None)
        self._checkpoint_due.discard(sid)
        self.stats["evicted"] += 1

    def _step(self, steps: dict[str, int]) -> tuple[dict, list[int]]:
        """One batched step of these sessions: ({session: logits}, their positions after it, in steps' order);
        logged for the store unless replaying."""
        if len(steps) < self.min_batch:
            if self._pad_steps >= PAD_RESET_STEPS:
                for pad in PAD_IDS:
                    if pad in self.pool:
                        self.pool.close(pad)
                self._pad_steps = 0
            pads = PAD_IDS[: self.min_batch - len(steps)]
            for pad in pads:
                if pad not in self.pool:
                    self.pool.open(pad)
            self._pad_steps += 1
            out = self.pool.step({**steps, **dict.fromkeys(pads, self.pad_input)})
            for pad in pads:
                out.pop(pad)
        else:
            out = self.pool.step(steps)
        self.stats["steps"] += 1
        self.stats["batch_rows"] += len(steps)
        positions = self.pool.positions(steps)
        if not self._replaying:
            for (sid, token), position in zip(steps.items(), positions):
                self._fed.setdefault(sid, []).append(LogEntry(position, [token], True))
        return out, positions

    def _feed(self, sid: str, tokens: list[int], keep_logits: bool):
        """Feed one session alone: (n, V) logits, or (1, V) for the last token when keep_logits is False. A single
        token takes the batched path's arithmetic (see _step); several take the chunked prefill."""
        if len(tokens) == 1:
            return self._step({sid: tokens[0]})[0][sid][None]
        logits = self.pool.push(sid, tokens, keep_logits=keep_logits)
        if not self._replaying:
            self._fed.setdefault(sid, []).append(LogEntry(self.pool.position(sid), list(tokens), keep_logits))
        return logits if keep_logits else logits[None]

    def _push_alone(self, job: Job, sid: str, tokens: list[int]) -> dict:
        logits = self._feed(sid, tokens, keep_logits=True)  # (n, V)
        self.stats["tokens_pushed"] += len(tokens)
        self.stats["predictions"] += len(tokens)
        return self._push_result(sid, self.pool.position(sid), logits, job.return_logits)

    def _push_result(self, sid: str, position: int, logits, return_logits: bool, next_tokens=None) -> dict:
        """A push's answer from its (n, V) logits (or a series model's outputs); next_tokens: their argmax, when
        the caller already took it for a whole round."""
        out = {"id": sid, "object": "session.push", "position": position}
        if self.series:
            out.update(self._series_outputs(logits, return_logits))
            return out
        out["next_tokens"] = next_tokens if next_tokens is not None else [int(i) for i in logits.argmax(dim=-1).tolist()]
        if return_logits:
            out["logits"] = logits.float().tolist()
        return out

    def _series_outputs(self, outputs, return_logits: bool) -> dict:
        """A series model's outputs (n, out_features), one row per observation: "predictions" (a regression
        head's values, e.g. a forecast) or "probabilities" and "classes" (a classifier's softmax and argmax; with
        "class_names" when the model was saved with them)."""
        if self.model.task != "classify":
            return {"predictions": outputs.float().tolist()}
        out = {"classes": [int(i) for i in outputs.argmax(dim=-1).tolist()],
               "probabilities": torch.softmax(outputs.float(), dim=-1).tolist()}
        if self.class_names is not None:  # the saved names of those classes, as the model was saved with them
            out["class_names"] = [self.class_names[i] for i in out["classes"]]
        if return_logits:
            out["logits"] = outputs.float().tolist()
        return out

    def _describe(self, sid: str) -> dict:
        last = self.pool.last_logits(sid)
        serve = self.meta[sid]["serve"]
        out = {"id": sid, "object": "session", "position": self.pool.position(sid)}
        if self.series:  # the outputs after the last observation, as a push answered them (none before the first)
            out.update(self._series_outputs(last[None], False) if last is not None else {})
        else:
            out["next_token"] = None if last is None else int(last.argmax())
        out["state_bytes"] = self.pool.session(sid).nbytes()
        if "chat" in serve:
            out["messages"] = list(serve["chat"]["messages"])
        return out

    def _blob(self, sid: str) -> bytes:
        return self.pool.state_bytes(sid, metadata={"serve": self.meta[sid]["serve"]}, frozen=self.frozen)

    def _persist(self) -> None:
        """Write this round's changes in one transaction: log entries, and checkpoints where due."""
        due = set(self._checkpoint_due)
        entries = []
        for sid, fed in self._fed.items():
            if self.meta.get(sid, {}).get("ephemeral") or sid not in self.pool:
                continue
            if self.unsaved.get(sid, 0) + len(fed) + self._phase.get(sid, 0) >= self.checkpoint_every:
                due.add(sid)
                self._phase.pop(sid, None)  # from now on, every checkpoint_every entries
            elif sid not in due:
                entries.extend((sid, entry) for entry in fed)
        checkpoints = [(sid, self.meta[sid]["owner"], self._blob(sid), self.pool.position(sid))
                       for sid in due if sid in self.pool and not self.meta[sid].get("ephemeral")]
        self.store.commit(checkpoints, entries)
        for sid, _ in entries:
            self.unsaved[sid] = self.unsaved.get(sid, 0) + 1
        for sid, *_ in checkpoints:
            self.unsaved[sid] = 0
        self.stats["checkpoints"] += len(checkpoints)
        self.stats["log_entries"] += len(entries)
        self._fed.clear()
        self._checkpoint_due.clear()

    def _checkpoint(self, sids) -> None:
        """Checkpoint these live sessions now (before they leave memory, and at shutdown)."""
        rows = [(sid, self.meta[sid]["owner"], self._blob(sid), self.pool.position(sid))
                for sid in sids if sid in self.pool and sid in self.meta and not self.meta[sid].get("ephemeral")]
        self.store.commit(rows, [])
        for sid, *_ in rows:
            self.unsaved[sid] = 0
        self.stats["checkpoints"] += len(rows)
