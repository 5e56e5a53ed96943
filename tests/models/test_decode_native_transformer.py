"""The native transformer decode step (leanseq.ops.decode_transformer) against the eager step: logits, the
KV cache and its state semantics (capacity growth, branching from old states), int8, fallbacks."""

from __future__ import annotations

import copy
import ctypes
import shutil

import pytest
import torch

from leanseq.models.transformer import TransformerConfig, TransformerLM, TransformerState
from leanseq.ops import decode, decode_transformer
from leanseq.ops.quant import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler"
)

BASE = {"vocab_size": 41, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 1024}
CONFIGS = {
    "rope-gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "rope-mha-bias": {"attention_bias": True, "rope_parameters": {"rope_theta": 500.0}},
    "rope-mqa-hd16": {"num_key_value_heads": 1, "head_dim": 16},
    "abs-gqa": {"num_key_value_heads": 2, "position_embedding": "absolute"},
    "abs-mha-tied": {"position_embedding": "absolute", "tie_word_embeddings": True},
}


@pytest.fixture(autouse=True)
def _reset():
    yield
    decode.set_enabled(None)
    decode.THREADS = None


def make(name, seed=0, **extra):
    torch.manual_seed(seed)
    model = TransformerLM(TransformerConfig(**{**BASE, **CONFIGS[name], **extra})).eval()
    with torch.no_grad():  # larger weights than the init, non-trivial norms and biases: every term matters
        for n, p in model.named_parameters():
            p.mul_(4.0) if n.endswith("weight") and "norm" not in n else p.add_(torch.randn_like(p) * 0.3)
    return model


def step(model, tokens, state, native_on: bool):
    decode.set_enabled(native_on)
    with torch.no_grad():
        return model.step(tokens, state)


def pooled_state(model, lengths, g, chunk=3):
    """Rows at different positions (as a SessionPool holds them), each prefilled in chunks of `chunk`."""
    states = []
    for n in lengths:
        s = model.init_state(1, capacity=4)
        ids = torch.randint(0, 41, (1, n), generator=g)
        with torch.no_grad():
            for i in range(0, n, chunk):
                _, s = model(ids[:, i:i + chunk], state=s, return_state=True)
        states.append(s)
    return TransformerState.concat(states)


def assert_states_equal(a, b):
    assert torch.equal(a.position, b.position)
    assert a.k.shape == b.k.shape
    torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-6)


CASES = ([(name, (0, 7, 2), 2) for name in CONFIGS]  # every config at batch 3, rows at different positions
         + [(name, (5,), 1) for name in ("rope-gqa-tied", "abs-mha-tied")]
         + [(name, tuple(range(17)), 2) for name in ("rope-mha-bias", "rope-mqa-hd16", "abs-gqa")])


@pytest.mark.parametrize("name,lengths,threads", CASES)
def test_native_step_equals_eager(name, lengths, threads):
    model = make(name)
    decode.THREADS = threads
    g = torch.Generator().manual_seed(1)
    state = pooled_state(model, lengths, g, chunk=3 if len(lengths) < 5 else 8)
    eager, native = state.clone(), state.clone()  # independent buffers
    for _ in range(4):  # crosses capacity doublings (4 -> 8 -> 16 -> 32)
        tokens = torch.randint(0, 41, (len(lengths),), generator=g)
        le, eager = step(model, tokens, eager, False)
        ln, native = step(model, tokens, native, True)
        torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)
        assert_states_equal(native, eager)
    assert model._native_decode_plan.error is None, model._native_decode_plan.error


@pytest.mark.parametrize("name", ["rope-mqa-hd16", "abs-gqa"])
def test_long_rows_use_chunked_attention(name):
    """Rows past 256 slots split their attention into chunks merged by max/sum rescaling (and a fresh row
    next to a long one leaves chunks empty)."""
    model = make(name)
    decode.THREADS = 2
    g = torch.Generator().manual_seed(5)
    state = pooled_state(model, (700, 0), g, chunk=350)
    eager, native = state.clone(), state.clone()
    for _ in range(2):
        tokens = torch.randint(0, 41, (2,), generator=g)
        le, eager = step(model, tokens, eager, False)
        ln, native = step(model, tokens, native, True)
        torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)
        assert_states_equal(native, eager)


def test_batch_256():
    model = make("rope-gqa-tied")
    g = torch.Generator().manual_seed(2)
    state = model.init_state(256)
    eager, native = state.clone(), state.clone()
    for _ in range(2):
        tokens = torch.randint(0, 41, (256,), generator=g)
        le, eager = step(model, tokens, eager, False)
        ln, native = step(model, tokens, native, True)
        torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)
        assert_states_equal(native, eager)


@pytest.mark.parametrize("name", ["rope-gqa-tied", "abs-mha-tied"])
def test_branching_from_old_states(name):
    """Steps share the cache buffers; stepping an old state again copies it first, in both paths alike."""
    model = make(name)
    ids = torch.randint(0, 41, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        _, s0 = model(ids[:, :5], return_state=True)
    decode.set_enabled(True)
    s, states = s0, [s0]
    with torch.no_grad():
        for t in range(5, 12):
            logits, s = model.step(ids[:, t], s)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)
            states.append(s)
        assert s.k.data_ptr() == states[1].k.data_ptr()  # appended in place, no copy per token
        before = s.clone()
        branch = model(torch.cat([ids[:, :5], ids[:, 9:10]], dim=1))[:, -1]
        results = []
        for native_on in (True, False):  # branch from the old state: a copy, and the newest state is intact
            lb, sb = step(model, ids[:, 9], states[0], native_on)
            torch.testing.assert_close(lb, branch, rtol=1e-4, atol=1e-4)
            assert sb.k.data_ptr() != s.k.data_ptr()
            assert_states_equal(s, before)
            results.append((lb, sb))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
        assert_states_equal(results[0][1], results[1][1])
        # continuing the newest state still works in place and still agrees with one long forward
        logits, s2 = model.step(ids[:, 11], s)
        assert s2.k.data_ptr() == s.k.data_ptr()
        ref = model(torch.cat([ids, ids[:, 11:]], dim=1))[:, -1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_int8_close_to_float32_and_native_equals_eager():
    model = make("rope-gqa-tied")
    q = quantize_int8(copy.deepcopy(model))
    attn = q.model.layers[0].self_attn
    assert all(isinstance(m, Int8Linear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, q.lm_head))
    assert isinstance(q.model.layers[1].mlp.down_proj, Int8Linear)
    assert q.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 41, (4, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, sf = model(ids[:, :24], return_state=True)
        _, sq = q(ids[:, :24], return_state=True)
    se, sn = sq.clone(), sq.clone()
    agree = total = 0
    max_err = 0.0
    for t in range(24, 40):
        tok = ids[:, t]
        lf, sf = step(model, tok, sf, True)
        le, se = step(q, tok, se, False)
        ln, sn = step(q, tok, sn, True)
        torch.testing.assert_close(ln, le, rtol=1e-4, atol=1e-4)  # same int8 weights, two kernels
        max_err = max(max_err, float((ln - lf).abs().max() / lf.abs().max()))
        agree += int((ln.argmax(-1) == lf.argmax(-1)).sum())
        total += tok.numel()
    assert q._native_decode_plan.error is None
    assert max_err < 0.05, max_err
    assert agree / total >= 0.9, agree / total
    decode.set_enabled(True)
    out_native = q.generate(ids[:, :6], 8, temperature=0)
    decode.set_enabled(False)
    assert torch.equal(out_native, q.generate(ids[:, :6], 8, temperature=0))


def test_fallbacks_take_the_eager_path():
    model = make("rope-gqa-tied")
    state = model.init_state(2)
    tokens = torch.tensor([1, 2])
    decode.set_enabled(False)
    assert decode_transformer.try_step(model, tokens, state) is None
    decode.set_enabled(True)
    with torch.no_grad():
        assert decode_transformer.try_step(model, tokens, state.clone()) is not None
    with torch.enable_grad():  # autograd with trainable weights: eager, so gradients flow
        assert decode_transformer.try_step(model, tokens, state.clone()) is None
        assert model.step(tokens, state.clone())[0].requires_grad
    drop = make("rope-gqa-tied", attention_dropout=0.5).train()
    with torch.no_grad():
        assert decode_transformer.try_step(drop, tokens, drop.init_state(2)) is None  # dropout: eager draws it
        drop.eval()
        assert decode_transformer.try_step(drop, tokens, drop.init_state(2)) is not None
    gelu = make("abs-gqa", hidden_act="gelu")
    with torch.no_grad():
        assert decode_transformer.try_step(gelu, tokens, gelu.init_state(2)) is None
        assert "hidden_act" in gelu._native_decode_plan.error
        assert gelu.step(tokens, gelu.init_state(2))[0].shape == (2, 41)
    m64 = make("rope-mha-bias").double()
    with torch.no_grad():
        assert decode_transformer.try_step(m64, tokens, m64.init_state(2)) is None
        assert "float64" in m64._native_decode_plan.error
        assert m64.step(tokens, m64.init_state(2))[0].dtype == torch.float64


def test_sizes_and_positions_are_checked():
    model = make("abs-gqa", max_position_embeddings=8)
    decode.set_enabled(True)
    s = model.init_state(1)
    with torch.no_grad():
        for t in range(8):
            _, s = model.step(torch.tensor([t]), s)
        with pytest.raises(ValueError, match="max_position_embeddings"):  # the eager step's own check
            model.step(torch.tensor([1]), s)
        with pytest.raises(RuntimeError, match="outside the vocabulary"):  # the C entry checks token ids
            decode_transformer.try_step(model, torch.tensor([1, 10**6]), model.init_state(2))
    plan = model._native_decode_plan
    fn = decode_transformer._function()
    k = torch.zeros(2 * 1 * 2 * 4 * 8)  # capacity 4, but claimed 5 below
    sizes = (ctypes.c_int64 * 7)(1, k.numel(), k.numel(), 1, 41, 10**6, plan.ptrs.numel())
    z, tok, pos = torch.zeros(10**6), torch.tensor([1]), torch.tensor([0])
    args = (*plan.args_fixed, sizes, 7, tok.data_ptr(), 1, k.data_ptr(), k.data_ptr())
    assert fn(*args, 5, pos.data_ptr(), z.data_ptr(), z.data_ptr(), 1) == 6
    assert fn(*args, 4, torch.tensor([4]).data_ptr(), z.data_ptr(), z.data_ptr(), 1) == 7  # slot 4 of 4
    assert fn(*args, 4, pos.data_ptr(), z.data_ptr(), z.data_ptr(), 1) == 0
