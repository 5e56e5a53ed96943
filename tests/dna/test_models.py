"""RC equivariance (exact), checkpoints and constant-memory streaming of the DNA classifiers."""

import pytest
import torch

from leanseq.dna import (
    DNAClassifier,
    DNAConfig,
    StreamingClassifier,
    classify_long,
    load_classifier,
    reverse_complement_ids,
    save_classifier,
)
from leanseq.dna.models import augment_rc


def small(backbone, **kw):
    base = {"hidden_size": 8, "num_layers": 2, "state_size": 4, "num_heads": 2, "intermediate_size": 16,
            "mamba2_head_dim": 4, "cnn_filters": 6, "cnn_width": 5}
    torch.manual_seed(0)
    return DNAClassifier(DNAConfig(backbone=backbone, **{**base, **kw})).eval()


def mirror(hidden):
    """RC's mirror of a (B, L, 2D) per-position output: positions reversed, the two strand halves swapped."""
    a, b = hidden.chunk(2, dim=-1)
    return torch.cat([b, a], dim=-1).flip(1)


@pytest.mark.parametrize("backbone", ["mamba", "mamba2", "transformer"])
@pytest.mark.parametrize("patch, embed_width", [(1, 0), (4, 10)])
def test_ps_is_exactly_rc_equivariant_and_invariant(backbone, patch, embed_width):
    model = small(backbone, rc="ps", patch=patch, embed_width=embed_width, num_classes=3)
    x = torch.randint(0, 5, (3, 48))
    rc = reverse_complement_ids(x)
    with torch.no_grad():
        h, h_rc = model.strand_hidden(x), model.strand_hidden(rc)
        logits, logits_rc = model(x), model(rc)
    assert h.shape == (3, 48 // patch, 16)
    torch.testing.assert_close(h_rc, mirror(h), atol=1e-5, rtol=0)  # equivariant per position
    torch.testing.assert_close(logits_rc, logits, atol=1e-5, rtol=0)  # invariant classification
    # not trivially so: another sequence gives other outputs
    assert (model(torch.randint(0, 5, (3, 48))) - logits).abs().max() > 1e-4


def test_ph_averages_strands_in_eval_and_none_does_not():
    x = torch.randint(0, 5, (4, 40))
    ph, none = small("mamba", rc="ph"), small("mamba", rc="none")
    with torch.no_grad():
        torch.testing.assert_close(ph(reverse_complement_ids(x)), ph(x), atol=1e-5, rtol=0)
        assert (none(reverse_complement_ids(x)) - none(x)).abs().max() > 1e-4
        ph.train()  # training sees the strand it is given (augmentation is the trainer's job)
        assert (ph(reverse_complement_ids(x)) - ph(x)).abs().max() > 1e-4
    flipped = augment_rc(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(f, r) or torch.equal(f, reverse_complement_ids(r[None])[0]) for f, r in zip(flipped, x))


def test_cnn_uses_both_strands():
    model = small("cnn")
    x = torch.randint(0, 5, (4, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(reverse_complement_ids(x)), model(x), atol=1e-5, rtol=0)
    assert model.num_parameters() == 4 * 6 * 5 + 6 + 6 + 1
    with pytest.raises(ValueError, match="shorter than the CNN's filters"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_bad_input_is_refused():
    model = small("mamba", patch=4)
    with pytest.raises(ValueError, match="outside"):
        model(torch.full((1, 8), 5))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="not a multiple of the model's patch size 4"):
        model(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="rc must be one of"):
        DNAConfig(rc="both")


@pytest.mark.parametrize("backbone, rc, patch", [("mamba", "ps", 2), ("transformer", "ph", 1), ("cnn", "none", 1)])
def test_checkpoint_round_trip(tmp_path, backbone, rc, patch):
    model = small(backbone, rc=rc, patch=patch, classes=("neg", "pos"))
    path = save_classifier(model, tmp_path / "m")
    if backbone != "cnn":  # the backbone folder is a leanseq checkpoint on its own
        import leanseq

        assert type(leanseq.load(path)) is type(model.lm)
    again = load_classifier(path)
    x = torch.randint(0, 5, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert again.config.classes == ("neg", "pos")
    (path / "dna_config.json").write_text('{"format_version": 1, "config": {"backbone": "rnn"}}')
    with pytest.raises(ValueError, match="backbone must be one of"):
        load_classifier(path)


def test_load_refuses_a_plain_checkpoint(tmp_path):
    model = small("mamba")
    model.lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="not a leanseq DNA classifier"):
        load_classifier(tmp_path / "lm")


@pytest.mark.parametrize("rc, pooling, embed_width", [("none", "max", 0), ("none", "mean", 10), ("ps", "max", 10),
                                                      ("ph", "last", 0)])
def test_streaming_in_chunks_equals_the_whole_sequence(rc, pooling, embed_width):
    model = small("mamba", rc=rc, pooling=pooling, patch=4, embed_width=embed_width)
    x = torch.randint(0, 5, (2, 1000))
    with torch.no_grad():
        whole = model(x)
    torch.testing.assert_close(classify_long(model, x, chunk_size=96), whole, atol=1e-5, rtol=1e-5)


def test_stream_state_is_constant_size_and_restores(tmp_path):
    model = small("mamba", rc="none", patch=4, embed_width=8)
    x = torch.randint(0, 5, (1, 4096))
    stream = StreamingClassifier(model)
    sizes = []
    for start in range(0, 4096, 512):
        stream.push(x[:, start:start + 512])
        sizes.append((stream.state.nbytes(), len(stream.state_bytes())))
        if start == 2048:
            saved = stream.state_bytes()
    # the state does not grow with the sequence (the blob's JSON header varies by a digit or two)
    assert len({n for n, _ in sizes}) == 1 and max(b for _, b in sizes) - min(b for _, b in sizes) < 16
    resumed = StreamingClassifier.restore(model, saved)
    for start in range(2560, 4096, 512):
        resumed.push(x[:, start:start + 512])
    with torch.no_grad():
        torch.testing.assert_close(resumed.logits(), model(x), atol=1e-5, rtol=1e-5)
    other = small("mamba", rc="none", patch=4, embed_width=8, hidden_size=16)
    with pytest.raises(ValueError):
        StreamingClassifier.restore(other, saved)
