"""The sessions API: open, push, generate (SSE), WebSocket, get, delete, fork, export/import; ordering and batching."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from websockets.sync.client import connect

import leanseq
from leanseq.stream import Session
from tests.serve.conftest import KEY_A, KEY_B, TEXT_MODEL, TOKEN_MODEL, export_and_import


@pytest.fixture(scope="module")
def http(text_server):
    with text_server.client() as c:
        yield c


def open_session(http, **body) -> dict:
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def push(http, sid, tokens, **extra) -> dict:
    r = http.post(f"/v1/sessions/{sid}/push", json={"tokens": tokens, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_prompt_logits_are_the_library_session_logits_bit_for_bit(http):
    model = leanseq.load(TEXT_MODEL)
    prompt = list(b"ROMEO: But soft")
    reference = Session(model).push(prompt)  # (n, V)
    opened = open_session(http, tokens=prompt, return_logits=True)
    assert opened["position"] == len(prompt)
    assert torch.equal(torch.tensor(opened["logits"]), reference)
    assert opened["next_tokens"] == reference.argmax(-1).tolist()
    same = open_session(http, prompt="ROMEO: But soft")  # text goes through the model's tokenizer
    assert same["next_tokens"] == opened["next_tokens"]


def test_every_stream_gets_the_same_bits_alone_or_batched(http):
    """A stream's logits do not depend on the traffic around it: pushed alone, or with 8 others at once."""
    prompt, steps = list(b"KING: "), list(b"my lord")
    alone = open_session(http, tokens=prompt)["id"]
    expected = [push(http, alone, [t], return_logits=True)["logits"][0] for t in steps]
    crowd = [open_session(http, tokens=prompt)["id"] for _ in range(8)]
    with ThreadPoolExecutor(8) as ex:
        for i, t in enumerate(steps):
            answers = list(ex.map(lambda sid, t=t: push(http, sid, [t], return_logits=True), crowd))
            for a in answers:
                assert a["logits"][0] == expected[i]  # floats from float32: equal means equal bits
                assert a["position"] == len(prompt) + i + 1


def test_pushes_to_one_session_apply_in_order_never_interleaved(http):
    sid = open_session(http, tokens=[65])["id"]
    with ThreadPoolExecutor(6) as ex:
        positions = list(ex.map(lambda t: push(http, sid, [t])["position"], [66 + i % 20 for i in range(30)]))
    assert sorted(positions) == list(range(2, 32))  # each push saw the one before it, none was lost or doubled
    assert http.get(f"/v1/sessions/{sid}").json()["position"] == 31
    # expected_position makes a retried push safe: a push that already landed is refused, not applied twice
    r = http.post(f"/v1/sessions/{sid}/push", json={"tokens": [70], "expected_position": 30})
    assert r.status_code == 409 and "position 31" in r.json()["error"]["message"]
    assert push(http, sid, [70], expected_position=31)["position"] == 32


def test_fork_export_import_delete(http, text_server):
    sid = open_session(http, prompt="To be, or not")["id"]
    fork = http.post(f"/v1/sessions/{sid}/fork")
    assert fork.status_code == 201
    twin = fork.json()["id"]
    push(http, twin, list(b" to be"))  # the fork moves on; the original must not
    copy, blob = export_and_import(http, sid)
    assert http.get(f"/v1/sessions/{copy}").json()["position"] == len("To be, or not")
    a, b = push(http, sid, [32], return_logits=True), push(http, copy, [32], return_logits=True)
    assert a["logits"] == b["logits"] and a["position"] == b["position"]
    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 1
    bad = http.post("/v1/sessions/import", content=bytes(tampered), headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 400 and "checksum" in bad.json()["error"]["message"]
    assert http.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    assert http.get(f"/v1/sessions/{sid}").status_code == 404
    assert http.post(f"/v1/sessions/{sid}/push", json={"tokens": [1]}).status_code == 404


def test_generate_streams_from_the_session_state(http):
    sid = open_session(http, prompt="HAMLET:")["id"]
    twin = http.post(f"/v1/sessions/{sid}/fork").json()["id"]
    events = []
    with http.stream("POST", f"/v1/sessions/{sid}/generate", json={"max_tokens": 8}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    steps = [json.loads(e) for e in events[:-2]]
    final = json.loads(events[-2])
    assert [s["position"] for s in steps] == list(range(len("HAMLET:") + 1, len("HAMLET:") + 9))
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 8
    # greedy generation is the argmax chain: pushing the same tokens to the twin predicts each next one
    tokens = [s["token"] for s in steps]
    predicted = [push(http, twin, [t])["next_tokens"][0] for t in tokens]
    assert predicted[:-1] == tokens[1:]
    whole = http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 3, "stream": False}).json()
    assert whole["tokens"][0] == predicted[-1] and whole["position"] == final["position"] + 3
    empty = open_session(http)["id"]
    r = http.post(f"/v1/sessions/{empty}/generate", json={"max_tokens": 3, "stream": False})
    assert r.status_code == 409 and "no tokens" in r.json()["error"]["message"]


def test_websocket_one_message_per_step(http, text_server):
    sid = open_session(http, prompt="ROMEO:")["id"]
    twin = http.post(f"/v1/sessions/{sid}/fork").json()["id"]
    ws_url = text_server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"
    with connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY_A}"}) as ws:
        answers = []
        for t in b" hi":
            ws.send(json.dumps({"token": t, "return_logits": True}))
            answers.append(json.loads(ws.recv()))
        assert [a["position"] for a in answers] == [7, 8, 9]
        ws.send("not json")
        assert json.loads(ws.recv())["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"tokens": [100_000]}))
        assert json.loads(ws.recv())["error"]["code"] == "token_out_of_vocabulary"
        ws.send(json.dumps({"tokens": [32]}))  # the connection is still usable after errors
        assert json.loads(ws.recv())["position"] == len("ROMEO:") + 4
    over_http = [push(http, twin, [t], return_logits=True) for t in b" hi"]
    assert [a["logits"] for a in answers] == [a["logits"] for a in over_http]
    with connect(ws_url + f"?api_key={KEY_B}") as ws:  # another key: the session does not exist for it
        assert json.loads(ws.recv())["error"]["status"] == 404


def test_websocket_short_form_answers_as_the_full_checks_do(http, text_server):
    """The usual message ({"token": id} / {"tokens": [id]}) takes a short path through the server; it must answer
    exactly what the fully checked form does, and refuse what that form refuses."""
    sid = open_session(http, prompt="KING:")["id"]
    twin = http.post(f"/v1/sessions/{sid}/fork").json()["id"]
    url = text_server.url.replace("http://", "ws://") + "/v1/sessions/{}/ws"
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with connect(url.format(sid), additional_headers=headers) as short, \
            connect(url.format(twin), additional_headers=headers) as full:
        for i, t in enumerate(b" my"):
            short.send(json.dumps({"token": t} if i % 2 else {"tokens": [t]}))
            full.send(json.dumps({"tokens": [t], "expected_position": 5 + i, "return_logits": False}))
            a, b = json.loads(short.recv()), json.loads(full.recv())
            assert a == {**b, "id": sid} and b["id"] == twin and a["position"] == 6 + i
        for bad, code in (({"token": 100_000}, "token_out_of_vocabulary"), ({"token": -1}, "invalid_request"),
                          ({"token": True}, "invalid_request"), ({"tokens": [1.0]}, "invalid_request"),
                          ({"token": 3, "tokens": [3]}, "invalid_request"), ({"tokens": []}, "empty_input")):
            short.send(json.dumps(bad))
            assert json.loads(short.recv())["error"]["code"] == code, bad
        short.send(b'{"token": 3}')  # a binary frame: refused with a message, the socket stays usable
        assert json.loads(short.recv())["error"]["code"] == "invalid_message"
        short.send(json.dumps({"token": 32}))
        assert json.loads(short.recv())["position"] == 9


def test_token_model_serves_sessions_and_refuses_text(make_server):
    server = make_server(TOKEN_MODEL)
    with server.client() as http:
        sid = open_session(http, tokens=[1, 2, 3])["id"]
        assert push(http, sid, [4])["position"] == 4
        gen = http.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4, "stream": False}).json()
        assert len(gen["tokens"]) == 4 and gen["text"] == ""
        r = http.post(f"/v1/sessions/{sid}/push", json={"text": "hello"})
        assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "tiny-mamba", "prompt": "hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"
        r = http.post(f"/v1/sessions/{sid}/push", json={"observations": [0.5, 1.5]})
        assert r.status_code == 400 and "series model" in r.json()["error"]["message"]


def test_a_refused_stream_gets_its_status_not_a_200_stream(http):
    fake = "s_" + "0" * 24
    r = http.post(f"/v1/sessions/{fake}/generate", json={"max_tokens": 3})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    empty = open_session(http)["id"]
    r = http.post(f"/v1/sessions/{empty}/generate", json={"max_tokens": 3})
    assert r.status_code == 409


def test_push_answer_text_is_the_json_encoders_text():
    """The usual WebSocket answer is formatted directly; it must be the very text the JSON encoder writes, and
    anything else must go through the encoder."""
    from leanseq.serve.app import push_answer_text, ws_json

    usual = {"id": "s_" + "0a" * 12, "object": "session.push", "position": 12, "next_tokens": [7]}
    others = [{**usual, "logits": [[0.5, -1.25]]}, {**usual, "next_tokens": [7, 8]},
              {**usual, "id": 's_"quoted'}, {**usual, "position": True},
              {"id": usual["id"], "object": "session.push", "position": 3, "predictions": [[0.5]]},
              {"error": {"message": "no", "code": "x", "status": 400}}]
    for answer in [usual, *others]:
        assert push_answer_text(answer) == ws_json(answer)
        assert json.loads(push_answer_text(answer)) == answer
