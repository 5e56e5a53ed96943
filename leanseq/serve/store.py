"""Where session states live between requests: a small store interface and its SQLite (WAL) implementation.

Before the server acknowledges a push, the push is durable here in one of two forms: a checkpoint (the
session's state blob, leanseq.stream's checksummed bytes) or a log entry (the tokens the push fed, a few bytes,
appended after the session's last checkpoint). Reading a session back (after an idle eviction or a restart)
restores its checkpoint and replays its log through the model, which gives the same state bit for bit: the
server's steps do not depend on what else was in the batch (see leanseq.serve.batching). A checkpoint replaces
the log before it in the same transaction, so a log stays short. Everything a store needs is in `Store`; a networked store (Postgres, Redis, FoundationDB) shared by
several replicas that route sessions by id implements the same few methods.

SQLite settings: WAL journal, so readers never block the writer and a commit is one append to the log; and
synchronous=NORMAL by default, under which a committed transaction survives the process being killed (SIGKILL,
OOM, a crash) but the last commits may be lost if the whole machine loses power. synchronous="full" fsyncs the
log on every commit and survives power loss too, at a few milliseconds per commit on an ordinary disk.
Copying the log back into the database file (a WAL checkpoint, with an fsync) is done by a background thread on
its own connection once a second, in PASSIVE mode, which never blocks the writer: left to SQLite's automatic
checkpoint, it would land inside whichever commit crossed the log's size limit and stall that round's answers.

The log table is a WITHOUT ROWID table: its rows live in one B-tree ordered by (session, position), where a
rowid table keeps a second one (the primary key's index); a round appends an entry to each of ~100 sessions,
scattered over the tree, and one tree to update instead of two took about a third off each commit's CPU.
Stores made before keep their rowid table, which the same statements read and write.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SYNC_MODES = ("normal", "full")


class LogEntry(NamedTuple):  # a tuple: a server makes one per push
    position: int  # the session's position after this push
    tokens: list[int]
    keep_logits: bool  # whether the push computed logits for every token (it changes the last one's bits)


def encode_tokens(tokens: list) -> str:
    """A log entry's tokens as stored: a JSON list. One token id (a push, the usual entry) is written directly,
    the very text json.dumps gives ("[5]") at a fraction of its cost; anything else (several ids, a series
    model's observations) goes through json.dumps."""
    if len(tokens) == 1 and type(tokens[0]) is int:
        return f"[{tokens[0]}]"
    return json.dumps(tokens)


@dataclass
class StoredSession:
    session_id: str
    owner: str
    blob: bytes
    position: int  # the checkpoint's position
    updated: float
    log: list[LogEntry]


class Store(abc.ABC):
    """The few operations the server needs; a write returns only once the data is durable."""

    @abc.abstractmethod
    def commit(self, checkpoints: list[tuple[str, str, bytes, int]], log: list[tuple[str, LogEntry]]) -> None:
        """In one durable transaction: insert or replace (session_id, owner, blob, position) checkpoints (dropping
        each one's older log entries) and append (session_id, LogEntry) log entries."""

    @abc.abstractmethod
    def get(self, session_id: str) -> StoredSession | None: ...

    @abc.abstractmethod
    def delete(self, session_id: str) -> bool:
        """Remove a session; True if it was there."""

    @abc.abstractmethod
    def owners(self) -> dict[str, str]:
        """{session_id: owner} for every stored session (the server counts sessions per key from it)."""

    @abc.abstractmethod
    def quarantine(self, session_id: str, reason: str) -> None:
        """Move a session whose blob cannot be loaded out of the way, keeping its bytes and the reason."""

    @abc.abstractmethod
    def quarantined(self) -> list[tuple[str, str]]:
        """(session_id, reason) of every quarantined session."""

    def close(self) -> None:
        """Flush and release the store."""


class SQLiteStore(Store):
    """Sessions in one SQLite file in WAL mode. One connection, used under a lock (the server's engine thread
    writes; request handlers may read)."""

    def __init__(self, path: str | Path, synchronous: str = "normal", wal_checkpoint_seconds: float = 1.0):
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path} is not a usable SQLite session store: {exc}") from exc
        if str(mode).lower() != "wal":
            raise ValueError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the store on a local disk")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # the background thread below does it
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS sessions (
                id TEXT PRIMARY KEY, owner TEXT NOT NULL, blob BLOB NOT NULL,
                position INTEGER NOT NULL, updated REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS log (
                id TEXT NOT NULL, position INTEGER NOT NULL, tokens TEXT NOT NULL, keep INTEGER NOT NULL,
                PRIMARY KEY (id, position)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS quarantine (
                id TEXT NOT NULL, owner TEXT, blob BLOB, reason TEXT NOT NULL, at REAL NOT NULL);
            """
        )
        self._closing = threading.Event()
        self._wal_thread = threading.Thread(target=self._wal_checkpoints, args=(wal_checkpoint_seconds,),
                                            name="leanseq-store-wal", daemon=True)
        self._wal_thread.start()

    def _wal_checkpoints(self, every: float) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            while not self._closing.wait(every):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError:  # busy: the next one catches up
                    pass
        finally:
            db.close()

    def commit(self, checkpoints, log):
        if not checkpoints and not log:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO sessions (id, owner, blob, position, updated) VALUES (?, ?, ?, ?, ?)",
                    [(sid, owner, sqlite3.Binary(blob), position, now) for sid, owner, blob, position in checkpoints],
                )
                self._db.executemany("DELETE FROM log WHERE id = ? AND position <= ?",
                                     [(sid, position) for sid, _, _, position in checkpoints])
                self._db.executemany(
                    "INSERT OR REPLACE INTO log (id, position, tokens, keep) VALUES (?, ?, ?, ?)",
                    [(sid, position, encode_tokens(tokens), int(keep)) for sid, (position, tokens, keep) in log],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, session_id):
        with self._lock:
            row = self._db.execute(
                "SELECT id, owner, blob, position, updated FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            entries = self._db.execute(
                "SELECT position, tokens, keep FROM log WHERE id = ? AND position > ? ORDER BY position",
                (session_id, row[3] if row else 0),
            ).fetchall()
        if row is None:
            return None
        log = []
        for position, tokens, keep in entries:
            try:
                ids = json.loads(tokens)
            except (TypeError, ValueError):
                ids = None  # reported by the reader, which checks every entry
            log.append(LogEntry(int(position), ids, bool(keep)))
        return StoredSession(row[0], row[1], bytes(row[2]), int(row[3]), float(row[4]), log)

    def delete(self, session_id):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self._db.execute("DELETE FROM log WHERE id = ?", (session_id,))
            self._db.execute("COMMIT")
        return cur.rowcount > 0

    def owners(self):
        with self._lock:
            return dict(self._db.execute("SELECT id, owner FROM sessions").fetchall())

    def quarantine(self, session_id, reason):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO quarantine (id, owner, blob, reason, at) "
                    "SELECT id, owner, blob, ?, ? FROM sessions WHERE id = ?", (reason, time.time(), session_id)
                )
                self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                self._db.execute("DELETE FROM log WHERE id = ?", (session_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def quarantined(self):
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute("SELECT id, reason FROM quarantine ORDER BY at")]

    def close(self):
        self._closing.set()
        self._wal_thread.join(30)
        with self._lock:
            if self._db is None:
                return
            # fold the log into the main file, so the store is one self-contained file at rest
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None
