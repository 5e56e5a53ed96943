import json

import pytest
import torch

from leanseq.text.tokenizer import (
    BYTE_TOKENIZER_CLASS,
    ENDOFTEXT,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    train_bpe,
)

TEXT = "ROMEO: But soft! what light — café, naïve, 日本語, 🎭 through yonder window breaks?\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    corpus.write_text((TEXT + "Juliet is the sun. Arise, fair sun, and kill the envious moon.\n") * 50)
    return train_bpe([corpus], vocab_size=320, show_progress=False)


def test_byte_tokenizer_round_trips_and_counts_bytes():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 257
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 256


def test_byte_tokenizer_specials():
    tok = ByteTokenizer(special_tokens=[ENDOFTEXT, "<|user|>"], bos_token=None, pad_token="<|user|>")
    ids = tok.encode(f"hi{ENDOFTEXT}<|user|>yo", add_eos=True)
    assert ids == [104, 105, 256, 257, 121, 111, 256]
    assert tok.decode(ids) == f"hi{ENDOFTEXT}<|user|>yo{ENDOFTEXT}"
    assert tok.decode(ids, skip_special_tokens=True) == "hiyo"
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("x", add_bos=True)


@pytest.mark.parametrize("make", ["byte", "bpe"])
def test_stream_decoder_prints_multibyte_characters_whole(make, bpe):
    tok = ByteTokenizer() if make == "byte" else bpe
    ids = tok.encode(TEXT)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    if make == "byte":  # 🎭 is 4 bytes: nothing comes out until the last of them arrives
        start = TEXT.encode().index("🎭".encode())
        assert pieces[start:start + 3] == ["", "", ""] and pieces[start + 3] == "🎭"


def test_stream_decoder_lets_invalid_bytes_out_and_finish_flushes():
    tok = ByteTokenizer()
    stream = tok.stream_decoder()
    out = [stream.push(i) for i in (0xFF, 0xFE, 0xFD, 0xFC, ord("a"))]
    assert "\ufffd" in "".join(out) and "".join(out).endswith("a")
    assert stream.push(0xE6) == ""  # first byte of a 3-byte character
    assert stream.finish() == "\ufffd"  # generation stopped mid-character


def test_decode_refuses_out_of_vocabulary_and_bad_types():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="token id 257 is outside the vocabulary"):
        tok.decode([72, 257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.0])
    with pytest.raises(TypeError, match="integers"):
        tok.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="encode"):
        tok.decode("abc")
    with pytest.raises(TypeError, match="takes a str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.stream_decoder().push(300)
    assert tok.decode(torch.tensor([104, 105])) == "hi"


def test_byte_tokenizer_save_and_load(tmp_path):
    tok = ByteTokenizer(special_tokens=[ENDOFTEXT, "<|user|>"], chat_template="{{ messages }}")
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == BYTE_TOKENIZER_CLASS
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.special_tokens == tok.special_tokens and loaded.chat_template == "{{ messages }}"
    assert loaded.encode(TEXT + "<|user|>") == tok.encode(TEXT + "<|user|>")


def test_bpe_round_trip_save_load_and_transformers(tmp_path, bpe):
    ids = bpe.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert bpe.decode(ids) == TEXT
    assert bpe.eos_token_id == bpe.special_tokens[ENDOFTEXT]
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode(TEXT) == ids and loaded.eos_token_id == bpe.eos_token_id
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(TEXT) == ids
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.encode(TEXT, add_special_tokens=False) == ids
    assert auto.eos_token_id == bpe.eos_token_id and auto.decode(ids) == TEXT


def test_hf_tokenizer_reads_specials_and_chat_template_from_config(tmp_path, bpe):
    bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(bos_token={"content": ENDOFTEXT, "special": True}, chat_template="{% for m in messages %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.bos_token_id == bpe.special_tokens[ENDOFTEXT]
    assert loaded.chat_template.startswith("{% for")
    config["eos_token"] = "<|nope|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token '<|nope|>' is not in the tokenizer's vocabulary"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": BYTE_TOKENIZER_CLASS}))
    with pytest.raises(ValueError, match="special_tokens"):
        load_tokenizer(tmp_path)


def test_train_bpe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_bpe([tmp_path / "nope.txt"], vocab_size=300)
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
        train_bpe([tmp_path / "a.txt"], vocab_size=100)


def test_the_package_loads_a_checkpoints_tokenizer():
    import leanseq
    from leanseq.models.commands import bundled_checkpoint

    tok = leanseq.load_tokenizer(bundled_checkpoint("shakespeare-mamba"))
    assert tok.decode(tok.encode("ROMEO: Ay, me!")) == "ROMEO: Ay, me!"
    assert tok.vocab_size == 257
