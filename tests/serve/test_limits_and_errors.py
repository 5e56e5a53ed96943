"""Keys, per-key visibility, limits (413/429) and bad input: always a 4xx with a JSON error body, never a 500."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.serve.conftest import KEY_A, KEY_B, KEY_FUZZ, TOKEN_MODEL

FAKE = "s_" + "0" * 24


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["code"]
    return body


@pytest.fixture(scope="module")
def http(text_server):
    with text_server.client() as c:
        yield c


def test_every_route_but_health_needs_a_key(text_server):
    with text_server.client(key=None) as anon:
        assert anon.get("/v1/health").json()["status"] == "ok"
        schema = anon.get("/openapi.json").json()
        routes = 0
        for path, methods in schema["paths"].items():
            if path == "/v1/health":
                continue
            for method in methods:
                r = anon.request(method.upper(), path.replace("{session_id}", FAKE), json={})
                assert error_of(r, 401)["code"] == "missing_api_key", (method, path)
                routes += 1
        assert routes >= 12
    with text_server.client(key="not-a-key") as wrong:
        assert error_of(wrong.get("/v1/models"), 401)["code"] == "invalid_api_key"


def test_a_session_is_visible_only_to_its_key(http, text_server):
    sid = http.post("/v1/sessions", json={"tokens": [1, 2]}).json()["id"]
    with text_server.client(KEY_B) as other:
        for method, path, body in [("GET", "", None), ("DELETE", "", None), ("POST", "/push", {"tokens": [1]}),
                                   ("POST", "/fork", None), ("GET", "/export", None),
                                   ("POST", "/generate", {"stream": False})]:
            r = other.request(method, f"/v1/sessions/{sid}{path}", json=body)
            assert error_of(r, 404)["code"] == "session_not_found", (method, path)
    assert http.get(f"/v1/sessions/{sid}").json()["position"] == 2  # untouched by the other key


def test_bad_input_gets_a_4xx_json_error(http):
    sid = http.post("/v1/sessions").json()["id"]
    push = f"/v1/sessions/{sid}/push"
    assert error_of(http.post(push, content=b"{not json", headers={"Content-Type": "application/json"}),
                    400)["code"] == "invalid_json"
    assert "tokens" in error_of(http.post(push, json={"tokens": "12"}), 422)["message"]
    error_of(http.post(push, json={"tokens": [True]}), 422)
    error_of(http.post(push, json={"tokens": [-1]}), 422)
    assert "outside the vocabulary [0, 257)" in error_of(http.post(push, json={"tokens": [257]}), 400)["message"]
    assert "tokn" in error_of(http.post(push, json={"tokn": [1]}), 422)["message"]  # typos are not ignored
    error_of(http.post(push, json={}), 400)
    error_of(http.post(push, json={"tokens": [1], "text": "a"}), 400)
    error_of(http.post(f"/v1/sessions/{FAKE}/push", json={"tokens": [1]}), 404)
    error_of(http.post("/v1/sessions/nonsense/push", json={"tokens": [1]}), 404)
    error_of(http.get("/v1/no-such-route"), 404)
    error_of(http.post("/v1/completions", json={"model": "shakespeare-mamba", "prompt": "a", "temperature": -1}), 422)
    error_of(http.post("/v1/completions", json={"model": "shakespeare-mamba", "prompt": "a", "top_k": 5}), 400)
    error_of(http.post("/v1/chat/completions", json={"model": "shakespeare-mamba", "messages": []}), 422)
    error_of(http.post("/v1/sessions/import", content=b"garbage", headers={"Content-Type": "application/octet-stream"}),
             400)


def test_limits_answer_413(http):
    sid = http.post("/v1/sessions").json()["id"]
    assert "limit is 300" in error_of(http.post(f"/v1/sessions/{sid}/push", json={"tokens": [1] * 301}),
                                      413)["message"]
    error_of(http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 301}), 413)
    error_of(http.post("/v1/completions", json={"model": "shakespeare-mamba", "prompt": "a" * 301}), 413)
    big = b'{"tokens": [' + b"1," * 150_000 + b"1]}"
    assert error_of(http.post(f"/v1/sessions/{sid}/push", content=big, headers={"Content-Type": "application/json"}),
                    413)["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b" " * 10_000

    error_of(http.post(f"/v1/sessions/{sid}/push", content=chunks(), headers={"Content-Type": "application/json"}),
             413)
    assert http.get(f"/v1/sessions/{sid}").json()["position"] == 0


def test_concurrent_streams_answer_429(http, text_server):
    sid = http.post("/v1/sessions", json={"tokens": [1]}).json()["id"]
    url = text_server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws?api_key={KEY_A}"
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(url)) for _ in range(3)]  # the fixture's limit
        for ws in sockets:  # each is open and working
            ws.send(json.dumps({"tokens": [2]}))
            assert "position" in json.loads(ws.recv())
        with connect(url) as extra:
            assert json.loads(extra.recv())["error"]["status"] == 429
        error_of(http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 2}), 429)


def test_sessions_per_key_answer_429(make_server):
    server = make_server(TOKEN_MODEL, "--max-sessions-per-key", "2")
    with server.client() as a, server.client(KEY_B) as b:
        first = a.post("/v1/sessions").json()["id"]
        a.post("/v1/sessions")
        assert "DELETE" in error_of(a.post("/v1/sessions"), 429)["message"]
        error_of(a.post(f"/v1/sessions/{first}/fork"), 429)
        assert b.post("/v1/sessions").status_code == 201  # the limit is per key
        a.delete(f"/v1/sessions/{first}")
        assert a.post("/v1/sessions").status_code == 201


def test_schemathesis_fuzzes_every_route_without_a_server_error(text_server):
    """Valid and invalid requests generated from the OpenAPI schema: each answer is < 500, 4xx ones JSON errors."""
    worker = Path(__file__).with_name("fuzz_worker.py")
    done = subprocess.run([sys.executable, str(worker), text_server.url, KEY_FUZZ, "4"], check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["operations"] >= 13
    assert counts["positive"] >= 2 * counts["operations"] and counts["negative"] >= counts["operations"]
