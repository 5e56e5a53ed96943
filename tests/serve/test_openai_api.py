"""The official openai client, unchanged, against `leanseq serve` on loopback."""

from __future__ import annotations

import openai
import pytest

import leanseq.text
from leanseq.models.commands import bundled_checkpoint
from tests.serve.conftest import KEY_A, KEY_B


@pytest.fixture(scope="module")
def client(text_server):
    return openai.OpenAI(base_url=f"{text_server.url}/v1", api_key=KEY_A, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["shakespeare-mamba"]


def test_completion_is_the_library_greedy_continuation_streamed_or_not(client):
    model, tok = leanseq.text.load(bundled_checkpoint("shakespeare-mamba"))
    expected = leanseq.text.generate(model, tok, "ROMEO:", max_new_tokens=24)
    whole = client.completions.create(model="shakespeare-mamba", prompt="ROMEO:", max_tokens=24)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len("ROMEO:") and whole.usage.completion_tokens == 24
    chunks = list(client.completions.create(model="shakespeare-mamba", prompt="ROMEO:", max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 24  # the usage chunk comes last, before [DONE]


def test_stop_string_ends_the_completion_early(client):
    out = client.completions.create(model="shakespeare-mamba", prompt="ROMEO:", max_tokens=200, stop=["\n"])
    assert "\n" not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 200


def test_chat_streamed_equals_chat_whole(client):
    messages = [{"role": "user", "content": "Speak, friend."}]
    whole = client.chat.completions.create(model="shakespeare-mamba", messages=messages, max_tokens=20)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="shakespeare-mamba", messages=messages, max_tokens=20, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 20


def test_chat_naming_a_session_continues_it_without_the_history(client, text_server):
    http = text_server.client()
    sid = http.post("/v1/sessions").json()["id"]
    first = client.chat.completions.create(model="shakespeare-mamba", max_tokens=12, extra_body={"session": sid},
                                           messages=[{"role": "user", "content": "Good morrow."}])
    # the second turn sends only the new message; the server renders it after the kept history
    second = client.chat.completions.create(model="shakespeare-mamba", max_tokens=12, extra_body={"session": sid},
                                            messages=[{"role": "user", "content": "And to you?"}])
    kept = http.get(f"/v1/sessions/{sid}").json()
    assert [m["role"] for m in kept["messages"]] == ["user", "assistant", "user", "assistant"]
    assert kept["messages"][1]["content"] == first.choices[0].message.content
    assert kept["messages"][3]["content"] == second.choices[0].message.content
    # the same conversation sent whole to a fresh chat gets the same second answer: the state held the history
    history = [{"role": "user", "content": "Good morrow."},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And to you?"}]
    if first.choices[0].finish_reason == "stop":  # a reply cut by max_tokens renders differently from what was fed
        again = client.chat.completions.create(model="shakespeare-mamba", max_tokens=12, messages=history)
        assert again.choices[0].message.content == second.choices[0].message.content
    assert second.usage.prompt_tokens < len("".join(m["content"] for m in history))


def test_client_errors_are_openai_errors(client, text_server):
    with pytest.raises(openai.NotFoundError, match="serves 'shakespeare-mamba'"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{text_server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="shakespeare-mamba", prompt="hi", max_tokens=2, n=2)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="shakespeare-mamba", prompt="hi", max_tokens=10_000)
    assert info.value.status_code == 413
    # another key's session cannot be continued (nor seen)
    sid = text_server.client(KEY_B).post("/v1/sessions").json()["id"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="shakespeare-mamba", max_tokens=2, extra_body={"session": sid},
                                       messages=[{"role": "user", "content": "hi"}])
