"""The SQLite session store: one transaction per commit, a checkpoint replaces the log before it, quarantine."""

from __future__ import annotations

import sqlite3

import pytest

from leanseq.serve.store import LogEntry, SQLiteStore


def test_checkpoints_and_log_round_trip(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.commit([("s1", "alice", b"blob-at-2", 2)], [])
    store.commit([], [("s1", LogEntry(3, [7], True)), ("s1", LogEntry(5, [8, 9], False))])
    got = store.get("s1")
    assert (got.owner, got.blob, got.position) == ("alice", b"blob-at-2", 2)
    assert [(e.position, e.tokens, e.keep_logits) for e in got.log] == [(3, [7], True), (5, [8, 9], False)]
    store.commit([("s1", "alice", b"blob-at-5", 5)], [])  # a checkpoint drops the log it covers
    assert store.get("s1").log == [] and store.get("s1").blob == b"blob-at-5"
    assert store.owners() == {"s1": "alice"} and store.get("nope") is None
    store.quarantine("s1", "checksum mismatch")
    assert store.get("s1") is None and store.quarantined() == [("s1", "checksum mismatch")]
    store.commit([("s2", "bob", b"b", 1)], [("s2", LogEntry(2, [1], True))])
    assert store.delete("s2") and not store.delete("s2")
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT COUNT(*) FROM log").fetchone()[0] == 0  # the deleted session's log went too


def test_bad_store_settings_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "a.db", synchronous="off")
    not_sqlite = tmp_path / "b.db"
    not_sqlite.write_bytes(b"this is not a database file at all, just text" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite session store"):
        SQLiteStore(not_sqlite)
