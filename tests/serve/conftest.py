"""Servers for the serve tests: the real app and engine under uvicorn, in a thread, on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from leanseq.cli import build_parser
from leanseq.models.commands import bundled_checkpoint

KEY_A, KEY_B, KEY_FUZZ = "key-a-0123456789", "key-b-0123456789", "key-fuzz-0123456789"
TEXT_MODEL = str(bundled_checkpoint("shakespeare-mamba"))
TOKEN_MODEL = str(bundled_checkpoint("tiny-mamba"))  # no tokenizer: token ids only


class LiveServer:
    """`leanseq serve` arguments -> the app running under uvicorn in a thread; stop() shuts it down gracefully."""

    def __init__(self, argv: list[str]):
        import uvicorn

        from leanseq.serve.commands import build

        args = build_parser().parse_args(["serve", *argv])
        self.engine, self.app, self.config = build(args)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def serve_argv(tmp_path, model: str = TEXT_MODEL, *extra: str) -> list[str]:
    return [model, "--api-key", KEY_A, "--api-key", KEY_B, "--api-key", KEY_FUZZ, "--db", str(tmp_path / "s.db"),
            "--no-access-log", *extra]


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    server = LiveServer(serve_argv(tmp_path_factory.mktemp("serve"), TEXT_MODEL, "--max-tokens-per-request", "300",
                                   "--max-body-bytes", "262144", "--max-concurrent-streams", "3"))
    yield server
    server.stop()


@pytest.fixture
def make_server(tmp_path):
    """LiveServer(serve_argv(tmp_path, model, *extra)); stopped at the end of the test."""
    servers = []

    def make(model: str = TEXT_MODEL, *extra: str) -> LiveServer:
        servers.append(LiveServer(serve_argv(tmp_path, model, *extra)))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def _one_thread_each_test(one_thread):
    """Every test here runs on one torch thread (see tests/conftest.py)."""


def export_and_import(http, sid: str) -> tuple[str, bytes]:
    """Export session `sid` as its state blob, import it as a new session -> (the new id, the blob)."""
    blob = http.get(f"/v1/sessions/{sid}/export")
    assert blob.status_code == 200 and blob.content.startswith(b"LSQSTATE")
    imported = http.post("/v1/sessions/import", content=blob.content,
                         headers={"Content-Type": "application/octet-stream"})
    assert imported.status_code == 201, imported.text
    return imported.json()["id"], blob.content
