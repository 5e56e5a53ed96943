"""forward(..., logits="last" | n): the last positions' logits equal those rows of the full logits, for every
family, with and without a state; the LM head really skips the other rows; generate and Session use it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from leanseq.models.base import LanguageModel
from leanseq.models.config import ConfigBase
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.models.state import State
from leanseq.models.transformer import TransformerConfig, TransformerLM
from leanseq.stream import Session

VOCAB = 37


def build(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    if kind == "mamba":
        model = MambaLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2))
    elif kind == "mamba_lti":
        model = MambaLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                                    selective=False))
    elif kind == "mamba2":
        model = Mamba2LM(Mamba2Config(vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, state_size=8,
                                      n_groups=2, num_hidden_layers=2, chunk_size=4))
    elif kind in ("llama", "absolute"):
        model = TransformerLM(TransformerConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
            position_embedding="rope" if kind == "llama" else "absolute"))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # larger weights than the training init, so logits differ clearly between tokens
        for name, p in model.named_parameters():
            if "embed" in name or "lm_head" in name:
                p.normal_(0.0, 1.0)
    return model.eval()


KINDS = ["mamba", "mamba_lti", "mamba2", "llama", "absolute"]


@pytest.fixture(params=KINDS)
def model(request):
    return build(request.param)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_last_equals_last_row_of_all_without_state(model):
    ids = torch.randint(0, VOCAB, (2, 11))
    full = model(ids)
    last = model(ids, logits="last")
    assert last.shape == (2, 1, VOCAB)
    close(last, full[:, -1:])
    three = model(ids, logits=3)
    assert three.shape == (2, 3, VOCAB)
    close(three, full[:, -3:])
    assert torch.equal(model(ids, logits=11), full)  # n = L is every position
    assert torch.equal(model(ids, logits="all"), full)


@torch.no_grad()
def test_last_equals_last_row_of_all_with_state_and_same_state(model):
    ids = torch.randint(0, VOCAB, (2, 13))
    _, state = model(ids[:, :6], return_state=True)
    full, s_full = model(ids[:, 6:], state=state.clone(), return_state=True)
    last, s_last = model(ids[:, 6:], state=state.clone(), return_state=True, logits="last")
    assert last.shape == (2, 1, VOCAB)
    close(last, full[:, -1:])
    assert torch.equal(s_last.position, s_full.position)
    # the state after the chunk does not depend on which logits were asked for: the next step agrees
    tok = torch.randint(0, VOCAB, (2,))
    step_full, _ = model.step(tok, s_full)
    step_last, _ = model.step(tok, s_last)
    close(step_last, step_full)
    # a fresh state from return_state alone works too
    last0, state0 = model(ids, return_state=True, logits="last")
    close(last0, model(ids)[:, -1:])
    assert state0.position.tolist() == [13, 13]


@torch.no_grad()
def test_last_runs_the_lm_head_on_one_row(model):
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        model(torch.randint(0, VOCAB, (3, 9)), logits="last")
        model(torch.randint(0, VOCAB, (3, 9)), state=model.init_state(3), return_state=True, logits=2)
    finally:
        hook.remove()
    assert [s[:2] for s in seen] == [(3, 1), (3, 2)]


def test_last_logits_carry_gradients_like_all(model):
    ids = torch.randint(0, VOCAB, (1, 7))
    model(ids)[:, -1].sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(ids, logits="last")[:, -1].sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bad, message", [
    ("first", "must be 'all', 'last' or an int"),
    (None, "must be 'all', 'last' or an int"),
    (True, "must be 'all', 'last' or an int"),
    (1.0, "must be 'all', 'last' or an int"),
    (slice(-1, None), "must be 'all', 'last' or an int"),
    (0, r"pass an int in \[1, 5\]"),
    (6, r"last 6 positions, but the input has 5 tokens"),
    (-1, r"pass an int in \[1, 5\]"),
])
def test_bad_logits_argument_is_refused(bad, message):
    model = build("mamba")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 5, dtype=torch.long), logits=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_unchanged_equals_full_forward_argmax_loop(kind):
    model = build(kind)
    prompt = torch.randint(0, VOCAB, (2, 6))
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "llama"])
def test_generate_prefills_with_the_last_logit_only(kind):
    model = build(kind)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        model.generate(torch.randint(0, VOCAB, (1, 20)), max_new_tokens=2, temperature=0)
    finally:
        hook.remove()
    assert (1, 20, model.lm_head.in_features) not in seen
    assert seen[0] == (1, 1, model.lm_head.in_features)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "llama"])
def test_session_keep_logits_false_uses_last_and_matches(kind):
    model = build(kind)
    prompt = torch.randint(0, VOCAB, (19,))
    full = Session(model, prefill_chunk_size=8).push(prompt)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        session = Session(model, prefill_chunk_size=8)
        last = session.push(prompt, keep_logits=False)
    finally:
        hook.remove()
    assert last.shape == (VOCAB,)
    close(last, full[-1])
    assert all(s[1] == 1 for s in seen) and len(seen) == 3  # three chunks, one LM-head row each
    tok = int(last.argmax())
    close(session.push(tok), Session(model).push(torch.cat([prompt, torch.tensor([tok])]))[-1])


# ---- a model that does not override _forward_last still honours the argument --------------------------------
@dataclasses.dataclass
class _GRUConfig(ConfigBase):
    model_type = "test_gru_logits"
    vocab_size: int = VOCAB
    hidden_size: int = 8


@dataclasses.dataclass
class _GRUState(State):
    hidden: torch.Tensor  # (1, B, H)


class _GRULM(LanguageModel):
    config_class = _GRUConfig
    state_class = _GRUState

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.gru = nn.GRU(config.hidden_size, config.hidden_size, batch_first=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch_size, device=None):
        return _GRUState(position=torch.zeros(batch_size, dtype=torch.long),
                         hidden=torch.zeros(1, batch_size, self.config.hidden_size))

    def _forward(self, input_ids, state):
        hidden, last = self.gru(self.embed(input_ids), None if state is None else state.hidden)
        logits = self.lm_head(hidden)
        if state is None:
            return logits, None
        return logits, _GRUState(position=state.position + input_ids.shape[1], hidden=last)


@torch.no_grad()
def test_subclass_without_override_gets_sliced_logits():
    torch.manual_seed(0)
    model = _GRULM(_GRUConfig()).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    full = model(ids)
    last, state = model(ids, return_state=True, logits="last")
    assert torch.equal(last, full[:, -1:]) and last.shape == (2, 1, VOCAB)
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size()  # not a view of (B, L, V)
    assert state.position.tolist() == [9, 9]
    assert torch.equal(model.generate(ids, 3, temperature=0)[:, :9], ids)
