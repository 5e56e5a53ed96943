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


def test_a_store_made_with_a_rowid_log_table_still_works(tmp_path):
    """Stores made before the log table became WITHOUT ROWID keep their table; the same statements serve both."""
    with sqlite3.connect(tmp_path / "old.db") as con:
        con.execute("CREATE TABLE log (id TEXT NOT NULL, position INTEGER NOT NULL, tokens TEXT NOT NULL, "
                    "keep INTEGER NOT NULL, PRIMARY KEY (id, position))")
        con.execute("INSERT INTO log VALUES ('s1', 3, '[7]', 1)")
    for name in ("old.db", "new.db"):
        store = SQLiteStore(tmp_path / name)
        store.commit([("s1", "alice", b"blob-at-2", 2)], [])
        store.commit([], [("s1", LogEntry(3, [7], True)), ("s1", LogEntry(4, [8], True))])
        assert [(e.position, e.tokens) for e in store.get("s1").log] == [(3, [7]), (4, [8])]
        store.commit([("s1", "alice", b"blob-at-4", 4)], [])
        assert store.get("s1").log == []
        store.close()
        with sqlite3.connect(tmp_path / name) as con:
            sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'log'").fetchone()[0]
        assert ("WITHOUT ROWID" in sql) == (name == "new.db")


def test_bad_store_settings_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "a.db", synchronous="off")
    not_sqlite = tmp_path / "b.db"
    not_sqlite.write_bytes(b"this is not a database file at all, just text" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite session store"):
        SQLiteStore(not_sqlite)


def test_log_tokens_are_stored_as_json_lists():
    """A push's one token id is written without json.dumps, as the very text json.dumps writes: stores stay
    readable by any leanseq version (every entry is a JSON list)."""
    import json

    from leanseq.serve.store import encode_tokens

    for tokens in ([0], [7], [65535], [-3], [2**40], [1, 2], [True], [[0.5, float("nan")]], [1.0]):
        assert encode_tokens(tokens) == json.dumps(tokens)
