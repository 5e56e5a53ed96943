"""`leanseq generate`: text mode with a tokenizer, ids mode, the bundled default, and one-line errors."""

import pytest
import torch

from leanseq import text
from leanseq.cli import main
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.text import ByteTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, state_size=8))
    path = tmp_path_factory.mktemp("ckpt") / "m"
    model.save_pretrained(path, tokenizer=ByteTokenizer())
    return path


def test_text_generation_streams_the_same_text_as_the_api(checkpoint, capsys):
    model, tok = text.load(checkpoint)
    expected = text.generate(model, tok, "ROMEO:", 20, temperature=0.7, seed=3, top_k=40)
    assert main(["generate", "-m", str(checkpoint), "-p", "ROMEO:", "-n", "20", "-t", "0.7", "-s", "3",
                 "--top-k", "40"]) == 0
    out = capsys.readouterr()
    assert out.out == "ROMEO:" + expected + "\n" and "ms" in out.err
    # long flags, greedy default, and a stop string (escapes understood) that is not printed
    greedy = text.generate(model, tok, "ab", 30, ignore_eos=True)
    stop = next(greedy[i:i + 2] for i in range(3, len(greedy) - 2) if greedy[i:i + 2].isascii())
    assert main(["generate", "--model", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "30",
                 "--ignore-eos", "--stop", stop]) == 0
    assert capsys.readouterr().out == "ab" + greedy[: greedy.index(stop)] + "\n"


def test_ids_mode_and_the_bundled_token_id_checkpoint(checkpoint, capsys):
    model = text.load(checkpoint)[0]
    expected = model.generate([[1, 2, 3]], 5, ignore_eos=True)[0, 3:].tolist()
    assert main(["generate", "-m", str(checkpoint), "--ids", "-p", "1 2 3", "-n", "5", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in expected]
    assert main(["generate", "--ids", "--prompt", "1 2 3", "--max-new-tokens", "4"]) == 0  # as the README shows
    assert len(capsys.readouterr().out.split()) == 4


def test_without_a_model_the_bundled_shakespeare_mamba_writes_text(capsys):
    """A fresh clone generates text at once: the default is the bundled byte-level model, greedy."""
    from leanseq.models.commands import bundled_checkpoint

    model, tok = text.load(bundled_checkpoint("shakespeare-mamba"))
    expected = text.generate(model, tok, "ROMEO:", 40)
    assert main(["generate", "-p", "ROMEO:", "-n", "40"]) == 0
    out = capsys.readouterr().out
    assert out == "ROMEO:" + expected + "\n"
    assert len(expected) >= 20  # 40 byte tokens of English: no early end-of-text


@pytest.mark.parametrize(("args", "message"), [
    (["-m", "{tmp}/nowhere/at/all", "-p", "x"], "does not exist"),
    (["-m", "{bare}", "-p", "x"], "--ids"),
    (["-m", "{ckpt}", "-p", "x", "--top-k", "5"], "--temperature"),
    (["-m", "{ckpt}", "-p", "x", "--stop", ""], "stop string must not be empty"),
    (["-m", "{ckpt}", "-p", "x", "-t", "nan"], "finite"),
    (["-m", "{ckpt}", "-p", "x", "--top-p", "0"], "top-p"),
    (["-m", "{ckpt}", "-p", "x", "-n", "-3"], "integer >= 0"),
    (["--ids", "-p", "ROMEO:"], "token ids"),
])
def test_bad_input_gets_one_clear_line(checkpoint, tmp_path, capsys, args, message):
    MambaLM(MambaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1)).save_pretrained(tmp_path / "bare")
    args = [a.format(tmp=tmp_path, bare=tmp_path / "bare", ckpt=checkpoint) for a in args]
    try:
        code = main(["generate", *args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
