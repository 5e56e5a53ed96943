"""`leanseq serve` on a series model: observations in, predictions out, over HTTP and WebSocket; the same durable
store, fork and export/import as token sessions; clear 400s for inputs of the wrong kind."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from websockets.sync.client import connect

from leanseq.series import SeriesModel
from leanseq.serve.batching import Engine, Job
from leanseq.serve.store import SQLiteStore
from leanseq.stream import Session
from tests.serve.conftest import KEY_A, LiveServer, export_and_import, serve_argv

OWNER = "owner-a"
# two channels, the second with a missing value (null): the encoder feeds it as 0 with its missing flag
SERIES = [[0.5, 1.0], [1.5, None], [-0.25, 2.0], [3.0, 0.0], [0.75, -1.5]]


def as_values(rows) -> list[list[float]]:
    return [[math.nan if v is None else float(v) for v in row] for row in rows]


@pytest.fixture(scope="module")
def regress_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "regress"
    model = SeriesModel.build("mamba", channels=2, out_features=3, task="regress", hidden_size=32, num_layers=2,
                              seed=0)
    model.fit_normalizer(torch.randn(64, 2) * 2 + 1)  # a normaliser that is not the identity
    model.save(folder)
    return folder


@pytest.fixture(scope="module")
def server(regress_dir, tmp_path_factory):
    live = LiveServer(serve_argv(tmp_path_factory.mktemp("serve-series"), str(regress_dir),
                                 "--max-tokens-per-request", "50"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def model(regress_dir):
    return SeriesModel.load(regress_dir)


def reference_steps(model, rows, batch: int = 8) -> list[torch.Tensor]:
    """Single observations stepped by an in-process Session of `batch` rows: the server steps every round as a
    batch of at least the size from which a row's bits stop depending on the batch (its start-up probe; 2 to 4 on
    CPU), so a stream's answers equal a row of any larger batch bit for bit."""
    session = Session(model, batch_size=batch)
    return [session.push(torch.tensor([row] * batch, dtype=torch.float64))[0] for row in as_values(rows)]


def test_push_predictions_equal_an_in_process_session(http, model):
    with torch.no_grad():
        whole = Session(model).push(as_values(SERIES[:3]))  # (3, 3): one chunked forward
    opened = http.post("/v1/sessions", json={"observations": SERIES[:3]})
    assert opened.status_code == 201, opened.text
    first = opened.json()
    assert first["position"] == 3
    assert torch.equal(torch.tensor(first["predictions"]), whole)  # bit for bit: floats survive JSON exactly
    sid = first["id"]
    # then one observation at a time: the pool's batched step
    for k, row in enumerate(SERIES[3:], start=3):
        r = http.post(f"/v1/sessions/{sid}/push", json={"observations": [row]}).json()
        assert r["position"] == k + 1 and len(r["predictions"]) == 1
    stepped = http.post("/v1/sessions", json={"observations": SERIES[:1]}).json()
    answers = [torch.tensor(stepped["predictions"][0])]
    for row in SERIES[1:]:
        answers.append(torch.tensor(http.post(f"/v1/sessions/{stepped['id']}/push",
                                              json={"observations": [row]}).json()["predictions"][0]))
    with torch.no_grad():
        exact = reference_steps(model, SERIES)
        plain = [Session(model).push(as_values(SERIES[: k + 1]))[-1] for k in range(len(SERIES))]
    assert all(torch.equal(a, b) for a, b in zip(answers, exact))
    # against a plain Session (a lone row, another rounding) the answers agree to float32 rounding
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(answers, plain))
    info = http.get(f"/v1/sessions/{stepped['id']}").json()
    assert info["position"] == len(SERIES) and info["predictions"] == [answers[-1].tolist()]


def test_every_stream_gets_the_same_bits_alone_or_batched(http):
    alone = http.post("/v1/sessions", json={"observations": SERIES[:2]}).json()["id"]
    expected = [http.post(f"/v1/sessions/{alone}/push", json={"observations": [r]}).json()["predictions"]
                for r in SERIES[2:]]
    crowd = [http.post("/v1/sessions", json={"observations": SERIES[:2]}).json()["id"] for _ in range(6)]
    with ThreadPoolExecutor(6) as ex:
        for i, row in enumerate(SERIES[2:]):
            got = list(ex.map(lambda sid, row=row: http.post(f"/v1/sessions/{sid}/push",
                                                             json={"observations": [row]}).json(), crowd))
            assert all(g["predictions"] == expected[i] for g in got)


def test_websocket_pushes_observations(http, server):
    sid = http.post("/v1/sessions", json={"observations": SERIES[:1]}).json()["id"]
    twin = http.post(f"/v1/sessions/{sid}/fork").json()["id"]
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY_A}"}) as ws:
        answers = []
        for row in SERIES[1:3]:
            ws.send(json.dumps({"observation": row}))
            answers.append(json.loads(ws.recv()))
        ws.send(json.dumps({"observations": SERIES[3:]}))  # several at once: one answer row each
        answers.append(json.loads(ws.recv()))
        ws.send(json.dumps({"observation": [1.0]}))
        assert json.loads(ws.recv())["error"]["code"] == "wrong_channel_count"
        ws.send(json.dumps({"token": 3}))
        assert json.loads(ws.recv())["error"]["code"] == "tokens_unsupported"
        ws.send(json.dumps({"observation": ["1.0", 2.0]}))  # a string is not a number
        assert json.loads(ws.recv())["error"]["status"] == 422
        ws.send('{"observation": [Infinity, 1.0]}')
        assert json.loads(ws.recv())["error"]["code"] == "non_finite_observation"
        ws.send(json.dumps({"observation": [0.0, 0.0], "extra": 1}))
        assert json.loads(ws.recv())["error"]["status"] == 422
    assert [a["position"] for a in answers] == [2, 3, 5]
    over_http = [http.post(f"/v1/sessions/{twin}/push", json={"observations": [r]}).json() for r in SERIES[1:3]]
    over_http.append(http.post(f"/v1/sessions/{twin}/push", json={"observations": SERIES[3:]}).json())
    assert [a["predictions"] for a in answers] == [a["predictions"] for a in over_http]


def test_fork_export_import_round_trip(http):
    sid = http.post("/v1/sessions", json={"observations": SERIES[:3]}).json()["id"]
    copy, _ = export_and_import(http, sid)
    fork = http.post(f"/v1/sessions/{sid}/fork").json()["id"]
    answers = [http.post(f"/v1/sessions/{s}/push", json={"observations": SERIES[3:]}).json()["predictions"]
               for s in (sid, copy, fork)]
    assert answers[0] == answers[1] == answers[2]


def test_wrong_inputs_get_clear_400s(http):
    sid = http.post("/v1/sessions").json()["id"]
    push = f"/v1/sessions/{sid}/push"

    def error(body, status=400) -> dict:
        r = http.post(push, json=body) if not isinstance(body, bytes) else \
            http.post(push, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert "2 channel" in error({"observations": [0.5, 1.0]})["message"]  # flat numbers: one channel only
    assert error({"observations": [[0.5, 1.0, 2.0]]})["code"] == "wrong_channel_count"
    assert error(b'{"observations": [[Infinity, 1.0]]}')["code"] == "non_finite_observation"
    assert error({"observations": [[1e39, 1.0]]})["code"] == "non_finite_observation"  # infinite in float32
    assert error({"tokens": [1, 2]})["code"] == "tokens_unsupported"
    assert error({"text": "hello"})["code"] == "tokens_unsupported"
    assert error({"observations": []})["code"] == "empty_input"
    error({"observations": [["1.0", 2.0]]}, 422)
    error({"observations": [[True, 2.0]]}, 422)
    assert error({"observations": [[0.0, 0.0]] * 51}, 413)["code"] == "too_many_tokens"
    assert http.get(f"/v1/sessions/{sid}").json()["position"] == 0  # nothing was applied
    # NaN (as null or as the NaN literal) is a missing value the model reads, not an error
    assert http.post(push, content=b'{"observations": [[NaN, null]]}',
                     headers={"Content-Type": "application/json"}).json()["position"] == 1
    r = http.post("/v1/completions", json={"model": "regress", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_text_model"
    r = http.post("/v1/chat/completions", json={"model": "regress", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_text_model"
    r = http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 2, "stream": False})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_token_model"
    # a token model's blob is another model's: refused
    token_blob = Session(SeriesModel.build("mamba", channels=1, out_features=1, hidden_size=16, num_layers=1,
                                           seed=1)).state_bytes()
    r = http.post("/v1/sessions/import", content=token_blob, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_state_blob"


def test_a_classifier_answers_probabilities_and_a_crash_replays_its_log_exactly(tmp_path):
    """One channel, plain numbers in; a killed engine's log (missing values included) replays bit for bit."""
    model = SeriesModel.build("mamba2", channels=1, out_features=4, task="classify", hidden_size=32, num_layers=1,
                              seed=2).eval()
    db = tmp_path / "s.db"
    crashed = Engine(model, SQLiteStore(db), stagger_checkpoints=False)  # never stopped: as if killed
    values = [[0.5], [math.nan], [-1.0], [2.5], [0.0], [1.25]]
    sid = crashed.submit(Job("open", OWNER, tokens=values[:2])).result(60)["id"]
    for row in values[2:4]:
        crashed.submit(Job("push", OWNER, session_id=sid, tokens=[row])).result(60)
    assert crashed.stats["log_entries"] == 2  # the last pushes are only in the log
    restarted = Engine(model, SQLiteStore(db))
    uninterrupted = Engine(model, SQLiteStore(tmp_path / "ref.db"))
    try:
        ref = uninterrupted.submit(Job("open", OWNER, tokens=values[:2])).result(60)["id"]
        for row in values[2:4]:
            uninterrupted.submit(Job("push", OWNER, session_id=ref, tokens=[row])).result(60)
        for row in values[4:]:
            a = restarted.submit(Job("push", OWNER, session_id=sid, tokens=[row], return_logits=True)).result(60)
            b = uninterrupted.submit(Job("push", OWNER, session_id=ref, tokens=[row],
                                         return_logits=True)).result(60)
            assert a["logits"] == b["logits"] and a["classes"] == b["classes"]
            assert math.isclose(sum(a["probabilities"][0]), 1.0, rel_tol=1e-5)
            assert a["classes"][0] == max(range(4), key=lambda c: a["probabilities"][0][c])
        assert restarted.stats["replayed"] == 2
    finally:
        restarted.stop()
        uninterrupted.stop()
        crashed.stop()


def test_a_classifier_saved_with_class_names_answers_them(tmp_path):
    """SeriesModel.save(metadata={"class_names": [...]}) -> every answer names its classes beside their indices,
    over HTTP and the WebSocket; names that do not fit the head are refused when saving and when loading."""
    from leanseq.models.checkpoint import CheckpointError

    model = SeriesModel.build("mamba", channels=1, out_features=3, task="classify", hidden_size=16, num_layers=1,
                              seed=3)
    names = ["calm", "rising", "spike"]
    with pytest.raises(ValueError, match="3 classes"):
        model.save(tmp_path / "short", metadata={"class_names": names[:2]})
    folder = tmp_path / "clf"
    model.save(folder, metadata={"class_names": names})
    live = LiveServer(serve_argv(tmp_path, str(folder)))
    try:
        with live.client() as http:
            r = http.post("/v1/sessions", json={"observations": [0.5, -1.0, 2.0]})
            assert r.status_code == 201, r.text
            opened = r.json()
            assert [names[c] for c in opened["classes"]] == opened["class_names"]  # GET-style: the last one
            pushed = http.post(f"/v1/sessions/{opened['id']}/push", json={"observations": [1.0, 0.25]}).json()
            assert len(pushed["class_names"]) == 2
            assert pushed["class_names"] == [names[c] for c in pushed["classes"]]
            with connect(live.url.replace("http", "ws") + f"/v1/sessions/{opened['id']}/ws",
                         additional_headers={"Authorization": f"Bearer {KEY_A}"}) as ws:
                ws.send(json.dumps({"observation": 0.75}))
                answer = json.loads(ws.recv(timeout=30))
                assert answer["class_names"] == [names[answer["classes"][0]]]
    finally:
        live.stop()
    config = folder / "series_config.json"  # a hand-edited folder: one name too many
    info = json.loads(config.read_text())
    info["metadata"]["class_names"] = [*names, "extra"]
    config.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="one name per class"):
        SeriesModel.load(folder)
