"""Generation: one prefill then steps; greedy equals a hand-rolled argmax loop; sampling is seedable."""

import pytest
import torch

from leanseq.models.generation import sample_next
from leanseq.models.mamba import MambaConfig, MambaLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(vocab_size=41, hidden_size=16, state_size=4, num_hidden_layers=2)).eval()


def test_greedy_equals_full_forward_argmax_loop(model):
    prompt = torch.randint(0, 41, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_stream_yields_the_same_tokens_one_at_a_time(model):
    prompt = torch.randint(0, 41, (1, 4))
    tokens = list(model.generate_stream(prompt, max_new_tokens=5, temperature=0.8, top_k=10, seed=7))
    assert len(tokens) == 5 and all(t.shape == (1,) for t in tokens)
    full = model.generate(prompt, max_new_tokens=5, temperature=0.8, top_k=10, seed=7)
    assert torch.equal(full[:, 4:], torch.stack(tokens, 1))


def test_seed_makes_sampling_reproducible_and_seeds_differ(model):
    prompt = torch.randint(0, 41, (3, 4))
    a = model.generate(prompt, 20, temperature=1.5, seed=1)
    b = model.generate(prompt, 20, temperature=1.5, seed=1)
    c = model.generate(prompt, 20, temperature=1.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_generation(model):
    prompt = torch.randint(0, 41, (1, 3))
    greedy = model.generate(prompt, 8, temperature=0)
    eos = int(greedy[0, 5])  # the third generated token
    out = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    assert out.shape[1] <= 6 and int(out[0, -1]) == eos


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert int(sample_next(logits, 1.0, top_k=1, generator=g)) == 1
        assert int(sample_next(logits, 1.0, top_p=0.01, generator=g)) == 1
        assert int(sample_next(logits, 1.0, top_k=2, generator=g)) in (1, 2)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=1.5)
    with pytest.raises(FloatingPointError, match="NaN"):
        sample_next(torch.tensor([[float("nan"), 1.0]]))
