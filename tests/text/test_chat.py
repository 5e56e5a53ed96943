"""The chat: state continuity across turns, save/load, templates, and the command loop through stdin."""

import io

import pytest
import torch

from leanseq.cli import main
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.stream import Session
from leanseq.text import ByteTokenizer, ChatSession

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def tiny(vocab=257, seed=0):
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()


def fed_ids(chat, tok, turns):
    """Token ids the chat put into its state: each turn's new text, then the reply's tokens."""
    return [i for delta, reply_ids in turns for i in [*tok.encode(delta), *reply_ids]]


@pytest.mark.parametrize("templated", [False, True])
def test_two_turns_equal_one_session_fed_the_same_text(templated):
    tok = ByteTokenizer(SPECIALS, eos_token="<|end|>", chat_template=TEMPLATE) if templated else ByteTokenizer()
    model = tiny(vocab=tok.vocab_size)
    chat = ChatSession(model, tok, max_new_tokens=12, options={"temperature": 0.9, "seed": 1})
    assert chat.format == ("template" if templated else "plain")
    turns = []
    for message in ["Hello there", "And again?"]:
        delta = chat.turn_text(message)
        reply = "".join(chat.reply(message))
        turns.append((delta, list(chat_ids(chat))))
        assert chat.messages[-1] == {"role": "assistant", "content": reply}
    if templated:
        assert turns[0][0] == "<|user|>Hello there<|end|><|assistant|>"
        assert turns[1][0].endswith("<|user|>And again?<|end|><|assistant|>")
    else:
        assert turns[0][0] == "User: Hello there\nAssistant:"
    one = Session(model)
    one.push(fed_ids(chat, tok, turns), keep_logits=False)
    assert one.position == chat.session.position  # nothing re-read, nothing dropped
    torch.testing.assert_close(one.last_logits, chat.session.last_logits, rtol=1e-4, atol=1e-4)


def chat_ids(chat):
    # the reply tokens are the tail of what the chat decoded into `fed`; RowSampler keeps them per turn
    return chat._last_ids


@pytest.fixture(autouse=True)
def record_reply_ids(monkeypatch):
    """Record each reply's token ids (the tests need them to rebuild the state independently)."""
    from leanseq.text import chat as chat_module

    original = chat_module.RowSampler

    class Recording(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Recording.last = self

    monkeypatch.setattr(chat_module, "RowSampler", Recording)
    monkeypatch.setattr(ChatSession, "_last_ids", property(lambda self: Recording.last.ids), raising=False)


def test_save_and_load_restore_the_conversation_exactly(tmp_path):
    tok = ByteTokenizer()
    model = tiny()
    chat = ChatSession(model, tok, max_new_tokens=10)
    "".join(chat.reply("first"))
    chat.save(tmp_path / "talk.lsq")
    after_save = "".join(chat.reply("second"))
    other = ChatSession(model, tok, max_new_tokens=10)
    other.load(tmp_path / "talk.lsq")
    assert other.messages == chat.messages[:2]
    assert "".join(other.reply("second")) == after_save
    torch.testing.assert_close(other.session.last_logits, chat.session.last_logits)
    other.reset()
    assert other.session.position == 0 and other.messages == []
    Session(model).save(tmp_path / "plain.lsq")
    with pytest.raises(ValueError, match="not a saved chat"):
        other.load(tmp_path / "plain.lsq")


def run_cli(monkeypatch, capsys, argv, stdin_text):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chat_command_through_stdin(tmp_path, monkeypatch, capsys):
    tok = ByteTokenizer()
    model = tiny()
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    script = f"hello\n/save {tmp_path / 's.lsq'}\nsecond\n/reset\n/load {tmp_path / 's.lsq'}\nsecond\n/bogus\n/quit\n"
    code, out, err = run_cli(monkeypatch, capsys, ["chat", "-m", str(tmp_path / "m"), "-n", "8",
                                                   "--energy-backend", "estimate"], script)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1] == lines[2]  # after /load, the same reply as before /reset
    status = [line for line in err.splitlines() if "tokens/s" in line]
    assert len(status) == 3 and all("J/token (estimated" in s for s in status)
    assert "unknown command /bogus" in err and "(conversation reset)" in err
    # EOF ends the chat cleanly too
    code, _, _ = run_cli(monkeypatch, capsys, ["chat", "-m", str(tmp_path / "m"), "-n", "2"], "hi\n")
    assert code == 0


def test_chat_refuses_a_model_without_tokenizer(tmp_path, monkeypatch, capsys):
    tiny().save_pretrained(tmp_path / "bare")
    code, _, err = run_cli(monkeypatch, capsys, ["chat", "-m", str(tmp_path / "bare")], "")
    assert code == 1 and "no tokenizer" in err
