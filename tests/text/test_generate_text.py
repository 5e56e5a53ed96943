"""Text generation: streaming pieces, stop strings across tokens, eos, options, and ragged batches."""

import pytest
import torch

from leanseq import text
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.transformer import TransformerConfig, TransformerLM
from leanseq.text import ByteTokenizer, StopStrings


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def tiny_mamba(seed=0, **ids):
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, state_size=8, **ids)).eval()


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(vocab_size=257, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2)).eval()


def greedy_ids(model, ids, n, eos=None):
    """Reference: the model's own generate on ids (no text involved)."""
    out = model.generate(torch.tensor([ids]), n, eos_token_id=eos, ignore_eos=eos is None)
    return out[0, len(ids):].tolist()


def stream_decode(tok, ids):
    """ids as the streaming decoder prints them (invalid UTF-8 from a random model is replaced per piece, so a
    whole-sequence decode may count U+FFFD differently)."""
    decoder = tok.stream_decoder()
    return decoder.extend(ids) + decoder.finish()


def test_stop_strings_hold_back_text_that_may_start_a_stop_and_cut_at_the_first():
    s = StopStrings(["END", "\n\n"])
    assert s.push("abc E") == ("abc ", False)  # "E" may begin "END"
    assert s.push("N") == ("", False)
    assert s.push("Dx") == ("", True)  # reached: nothing of END (nor after it) is returned
    s = StopStrings(["END"])
    pieces = [s.push(p) for p in ["ab", "cE", "NQ"]]
    assert pieces == [("ab", False), ("c", False), ("ENQ", False)]
    s = StopStrings(["END"])
    assert [s.push(p) for p in ["xE", "N", "Dyy"]] == [("x", False), ("", False), ("", True)]
    for bad in ([""], [None], [3]):
        with pytest.raises(ValueError, match="non-empty"):
            StopStrings(bad)


def test_streamed_pieces_are_the_decoded_greedy_tokens(tok):
    model = tiny_mamba()
    ids = tok.encode("ROMEO:")
    pieces = list(text.stream_text(model, tok, "ROMEO:", 24, ignore_eos=True))
    expected = greedy_ids(model, ids, 24)
    assert "".join(pieces) == stream_decode(tok, expected)
    assert len(pieces) > 1  # streamed, not returned at the end


def test_generation_stops_at_a_stop_string_spanning_tokens_without_printing_it(tok):
    model = tiny_mamba()
    full = stream_decode(tok, greedy_ids(model, tok.encode("ab"), 40))
    assert len(full) > 12
    # three ASCII characters (three tokens) from the middle of the text; the random model also emits bytes
    # that are not valid UTF-8, which decode to U+FFFD
    start = next(i for i in range(4, len(full) - 3) if all(32 < ord(c) < 127 for c in full[i:i + 3]))
    stop = full[start:start + 3]
    out = text.generate(model, tok, "ab", 40, stop=[stop], ignore_eos=True)
    assert out == full[: full.index(stop)]


def test_eos_stops_generation_by_default_from_the_model_config_or_the_tokenizer(tok):
    model = tiny_mamba()
    generated = greedy_ids(model, tok.encode("hi"), 30)
    eos = generated[4]
    with_eos = tiny_mamba(eos_token_id=eos)
    first = generated.index(eos)
    assert text.generate(with_eos, tok, "hi", 30) == stream_decode(tok, generated[:first])
    assert text.generate(with_eos, tok, "hi", 30, ignore_eos=True) == stream_decode(tok, generated)
    # no eos in the config: the tokenizer's (256 here) applies
    model.lm_head.weight.data[256] = 100.0 * model.lm_head.weight.data[256].sign()  # make eos likely
    assert text.generate(model, tok, "hi", 30) == stream_decode(tok, greedy_ids(model, tok.encode("hi"), 30, eos=256))


def test_sampling_options_match_the_model_level_engine(tok):
    model = tiny_mamba()
    ids = tok.encode("x")
    # the vocabulary is exactly the tokenizer's here, so the same seed gives the same draws
    ref = model.generate(torch.tensor([ids]), 16, temperature=0.9, top_k=20, top_p=0.9, seed=3, ignore_eos=True,
                         repetition_penalty=1.3)
    out = text.generate(model, tok, "x", 16, temperature=0.9, top_k=20, top_p=0.9, seed=3, ignore_eos=True,
                        repetition_penalty=1.3)
    assert out == stream_decode(tok, ref[0, 1:].tolist())
    assert out != text.generate(model, tok, "x", 16, temperature=0.9, seed=4, ignore_eos=True)


@pytest.mark.parametrize("make", [tiny_mamba, tiny_transformer])
@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "seed": 5, "repetition_penalty": 1.2}])
def test_a_ragged_batch_equals_one_prompt_at_a_time(tok, make, options):
    model = make()
    prompts = ["a", "a much longer prompt than the first", "mid length"]
    alone = [text.generate(model, tok, p, 20, ignore_eos=True, **options) for p in prompts]
    assert text.generate(model, tok, prompts, 20, ignore_eos=True, **options) == alone
    # rows that finish early (a stop string) leave the batch without disturbing the others
    stop = alone[1][3:5]
    alone_stop = [text.generate(model, tok, p, 20, ignore_eos=True, stop=[stop], **options) for p in prompts]
    assert text.generate(model, tok, prompts, 20, ignore_eos=True, stop=[stop], **options) == alone_stop


@pytest.mark.parametrize(("options", "message"), [
    ({"top_k": 5}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": 0.5, "top_p": 1.5}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": [""]}, "non-empty"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_bad_options_are_refused_when_called(tok, options, message):
    model = tiny_mamba()
    options = {"max_new_tokens": 4, **options}
    with pytest.raises(ValueError, match=message):
        text.stream_text(model, tok, "x", **options)


def test_a_tokenizer_larger_than_the_model_is_refused():
    model = MambaLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="do not belong together"):
        text.generate(model, ByteTokenizer(), "x", 2)


def test_text_load_returns_model_and_tokenizer_and_save_writes_both(tmp_path, tok):
    model = tiny_mamba()
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()
    loaded, loaded_tok = text.load(tmp_path / "m")
    assert loaded.tokenizer is loaded_tok and loaded_tok.eos_token_id == 256
    assert loaded.config.eos_token_id == 256  # taken from the tokenizer when the config had none
    assert text.generate(loaded, loaded_tok, "hey", 10) == text.generate(model, tok, "hey", 10)
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        text.load(tmp_path / "bare")
