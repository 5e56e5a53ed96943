"""Nothing lost: states written before answers, SIGKILL and restart, idle eviction, quarantine, batching."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import leanseq
from leanseq.serve.batching import Engine, Job, ServeError
from leanseq.serve.store import SQLiteStore
from tests.serve.conftest import KEY_A, TEXT_MODEL, TOKEN_MODEL

OWNER = "owner-a"


def call(engine, job: Job, timeout: float = 120):
    return engine.submit(job).result(timeout)


def open_with(engine, tokens) -> str:
    return call(engine, Job("open", OWNER, tokens=list(tokens)))["id"]


def push(engine, sid, token) -> list[float]:
    return call(engine, Job("push", OWNER, session_id=sid, tokens=[token], return_logits=True))["logits"][0]


@pytest.fixture(scope="module")
def model():
    return leanseq.load(TOKEN_MODEL)


def test_idle_sessions_leave_memory_for_the_store_and_continue_exactly(model, tmp_path):
    kept = Engine(model, SQLiteStore(tmp_path / "kept.db"), idle_seconds=300)
    evicted = Engine(model, SQLiteStore(tmp_path / "evicted.db"), idle_seconds=0.0)  # out after every round
    try:
        a, b = open_with(kept, [1, 2, 3]), open_with(evicted, [1, 2, 3])
        for t in [4, 5, 6, 7, 8]:
            assert push(kept, a, t) == push(evicted, b, t)
        assert evicted.stats["evicted"] >= 5 and evicted.stats["loaded"] >= 5
        deadline = time.monotonic() + 60  # the eviction runs right after the answer
        while evicted.live_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert evicted.live_sessions == 0 and len(evicted.owners) == 1  # out of memory, still stored
        assert call(evicted, Job("info", OWNER, session_id=b))["position"] == 8
    finally:
        kept.stop()
        evicted.stop()


def test_a_corrupt_row_is_quarantined_never_loaded(model, tmp_path):
    db = tmp_path / "s.db"
    engine = Engine(model, SQLiteStore(db))
    good, bad = open_with(engine, [1, 2]), open_with(engine, [3, 4])
    other_model = leanseq.load(TEXT_MODEL)
    foreign = Engine(other_model, SQLiteStore(tmp_path / "other.db"))
    alien_blob = call(foreign, Job("export", OWNER, session_id=open_with(foreign, [5])))
    foreign.stop()
    alien = open_with(engine, [5])
    engine.stop()
    # never stopped, as if killed: its last pushes are only in the log
    crashed = Engine(model, SQLiteStore(db), stagger_checkpoints=False)
    gap = open_with(crashed, [5, 6])
    push(crashed, gap, 7)
    push(crashed, gap, 8)
    with sqlite3.connect(db) as con:
        blob = bytearray(con.execute("SELECT blob FROM sessions WHERE id = ?", (bad,)).fetchone()[0])
        blob[len(blob) // 2] ^= 0x10  # one flipped bit on disk
        con.execute("UPDATE sessions SET blob = ? WHERE id = ?", (bytes(blob), bad))
        con.execute("UPDATE sessions SET blob = ? WHERE id = ?", (alien_blob, alien))  # whole, but another model's
        con.execute("DELETE FROM log WHERE id = ? AND position = 3", (gap,))  # a logged push lost: a gap
    restarted = Engine(model, SQLiteStore(db))
    try:
        for sid, why in [(bad, "checksum"), (alien, "another model"), (gap, "gap")]:
            with pytest.raises(ServeError, match=why) as info:
                call(restarted, Job("push", OWNER, session_id=sid, tokens=[1]))
            assert info.value.status == 410
            with pytest.raises(ServeError, match="quarantined"):  # and stays refused
                call(restarted, Job("info", OWNER, session_id=sid))
        reasons = dict(restarted.store.quarantined())
        assert set(reasons) == {bad, alien, gap} and "checksum" in reasons[bad]
        assert call(restarted, Job("info", OWNER, session_id=good))["position"] == 2  # the others are fine
    finally:
        restarted.stop()
        crashed.stop()


def test_concurrent_sessions_step_as_one_batch_with_the_same_bits(model, tmp_path):
    db = tmp_path / "s.db"
    first = Engine(model, SQLiteStore(db))
    sids = [open_with(first, [i + 1, i + 2]) for i in range(16)]
    first.stop()
    shutil.copy(db, tmp_path / "copy.db")
    batched = Engine(model, SQLiteStore(db), start=False)  # the 16 pushes arrive together
    futures = [batched.submit(Job("push", OWNER, session_id=s, tokens=[7], return_logits=True)) for s in sids]
    batched.start()
    together = [f.result(120)["logits"][0] for f in futures]
    assert batched.stats["steps"] == 1 and batched.stats["batch_rows"] == 16
    batched.stop()
    one_by_one = Engine(model, SQLiteStore(tmp_path / "copy.db"))
    try:
        assert [push(one_by_one, s, 7) for s in sids] == together
        assert one_by_one.stats["steps"] == 16
    finally:
        one_by_one.stop()


# ---- a real server process, killed with SIGKILL mid-load ------------------------------------------------------
started: list[subprocess.Popen] = []  # every server process a test started, killed if the test fails


class ServerProcess:
    def __init__(self, db):
        cmd = [sys.executable, "-m", "leanseq.cli", "serve", TEXT_MODEL, "--api-key", KEY_A, "--db", str(db),
               "--port", "0", "--no-access-log"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        started.append(self.proc)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stderr], daemon=True).start()
        deadline, seen = time.monotonic() + 120, []
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise RuntimeError(f"leanseq serve did not start: {''.join(seen)}") from None
            seen.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                return

    def client(self):
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)


def stream_tokens(i: int, n: int = 400) -> list[int]:
    return [ord("a") + (i * 7 + k * 3) % 26 for k in range(n)]


def test_sigkill_mid_load_loses_no_acknowledged_push_and_restarts_bit_for_bit(tmp_path):
    db = tmp_path / "sessions.db"
    server = ServerProcess(db)
    try:
        run_and_kill(server, db, tmp_path)
    finally:
        for proc in started:
            if proc.poll() is None:  # a failure on the way must not leave a server behind
                proc.kill()
                proc.wait(30)


def run_and_kill(server, db, tmp_path):
    n = 6
    prompts = [list(f"stream {i}: ".encode()) for i in range(n)]
    with server.client() as http:
        sids = [http.post("/v1/sessions", json={"tokens": p}).json()["id"] for p in prompts]
    acked = [[] for _ in range(n)]  # (position, logits) of every answered push
    sent = [0] * n

    def client(i):
        with server.client() as http:
            for token in stream_tokens(i):
                sent[i] += 1
                try:
                    r = http.post(f"/v1/sessions/{sids[i]}/push", json={"tokens": [token], "return_logits": True})
                except httpx.HTTPError:
                    return  # the server is gone
                answer = r.json()
                acked[i].append((answer["position"], answer["logits"][0]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(len(a) for a in acked) < 20 * n and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGKILL)  # mid-load: pushes are in flight
    server.proc.wait(30)
    for t in threads:
        t.join(60)
    assert all(len(a) >= 1 for a in acked)

    restarted = ServerProcess(db)
    reference = Engine(leanseq.load(TEXT_MODEL), SQLiteStore(tmp_path / "reference.db"))  # the uninterrupted run
    try:
        with restarted.client() as http:
            positions = []
            for i, sid in enumerate(sids):
                position = http.get(f"/v1/sessions/{sid}").json()["position"]
                pushed = position - len(prompts[i])
                # every acknowledged push is there; at most the one in flight beyond it
                assert len(acked[i]) <= pushed <= sent[i]
                positions.append(position)
                ref = open_with(reference, prompts[i])
                ref_logits = [push(reference, ref, t) for t in stream_tokens(i)[: pushed + 1]]
                # the answers given before the kill were this very stream
                assert [logits for _, logits in acked[i]] == ref_logits[: len(acked[i])]
                # and the next prediction after the restart is the uninterrupted run's, bit for bit
                after = http.post(f"/v1/sessions/{sid}/push",
                                  json={"tokens": [stream_tokens(i)[pushed]], "return_logits": True}).json()
                assert after["position"] == position + 1
                assert after["logits"][0] == ref_logits[pushed]
            metrics = http.get("/metrics").text
            assert float(re.search(r"^leanseq_log_replayed_total (\S+)", metrics, re.MULTILINE).group(1)) > 0  # logs replayed
        # `leanseq serve` on the bundled text model answers a chat completion through the openai client
        chat = openai.OpenAI(base_url=f"{restarted.url}/v1", api_key=KEY_A, max_retries=0, timeout=60)
        reply = chat.chat.completions.create(model="shakespeare-mamba", max_tokens=8,
                                             messages=[{"role": "user", "content": "Hail!"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
    finally:
        reference.stop()
        # graceful shutdown (SIGTERM): finishes, leaves the store whole and checkpointed, then exits by the signal
        # it got (uvicorn re-raises it after shutting down, so a supervisor sees why it stopped)
        restarted.proc.send_signal(signal.SIGTERM)
        assert restarted.proc.wait(60) in (0, -signal.SIGTERM)
        assert "stopped" in "".join(restarted.lines.queue)
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with sqlite3.connect(db) as con:
        stored = dict(con.execute("SELECT id, position FROM sessions").fetchall())
    assert [stored[s] for s in sids] == [p + 1 for p in positions]
