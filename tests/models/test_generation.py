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


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5, True, "1.0"])
def test_bad_temperature_is_refused_before_any_work(model, temperature):
    prompt = torch.randint(0, 41, (1, 3))
    with pytest.raises((ValueError, TypeError), match="temperature"):
        model.generate(prompt, 4, temperature=temperature)
    with pytest.raises((ValueError, TypeError), match="temperature"):
        sample_next(torch.zeros(1, 41), temperature)


@pytest.mark.parametrize("temperature", [1e-3, 1e-38, 1e-45, 5e-324])
def test_tiny_temperature_is_greedy_not_nan(model, temperature):
    # logits / 1e-38 overflow float32: softmax of inf is NaN and multinomial used to fail; a tiny temperature
    # means "almost greedy", so the largest logit must win
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0], [3.0, -2.0, 2.9, 1.0]])
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert sample_next(logits, temperature, generator=g).tolist() == [1, 0]
        assert sample_next(logits, temperature, top_p=0.9, generator=g).tolist() == [1, 0]
    prompt = torch.randint(0, 41, (2, 4))
    assert torch.equal(model.generate(prompt, 5, temperature=1e-40, seed=0), model.generate(prompt, 5, temperature=0))


@pytest.mark.parametrize("max_new_tokens", [2.5, 3.0, True, "3", None])
def test_max_new_tokens_must_be_an_int(model, max_new_tokens):
    prompt = torch.randint(0, 41, (1, 3))
    with pytest.raises((ValueError, TypeError), match="max_new_tokens"):
        model.generate(prompt, max_new_tokens, temperature=0)


@pytest.mark.parametrize("eos", [-1, 41, 10**9, 2.0, True])
def test_eos_token_id_must_be_in_the_vocabulary(model, eos):
    prompt = torch.randint(0, 41, (1, 3))
    with pytest.raises((ValueError, TypeError), match="eos_token_id"):
        model.generate(prompt, 4, temperature=0, eos_token_id=eos)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1, 41]]), "outside the vocabulary"),  # token id out of range
    (torch.tensor([1, 2]), "shape"),  # 1-d
    (torch.tensor([[1.0, 2.0]]), "integer"),  # floats
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
def test_max_new_tokens_zero_still_checks_the_input(model, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(bad, 0)
    with pytest.raises((ValueError, TypeError), match="max_new_tokens"):
        model.generate(torch.tensor([[1, 2]]), -1)
    assert torch.equal(model.generate(torch.tensor([[1, 2]]), 0), torch.tensor([[1, 2]]))


def test_generate_stream_refuses_bad_arguments_when_called_not_when_iterated(model):
    with pytest.raises(ValueError, match="temperature"):
        model.generate_stream(torch.tensor([[1, 2]]), 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        model.generate_stream(torch.tensor([[1, 2]]), 3, top_k=0)


def test_sample_next_refuses_logits_it_cannot_sample_from():
    with pytest.raises(FloatingPointError, match=r"\+inf"):
        sample_next(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(FloatingPointError, match="-inf everywhere"):
        sample_next(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]))
    masked = torch.tensor([[float("-inf"), 1.0, 0.5]])  # a caller's mask of banned tokens still works
    assert int(sample_next(masked, 1e-40)) == 1
