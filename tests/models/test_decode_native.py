"""The native decode step (leanseq.ops.decode) against the eager step, for every family and option."""

from __future__ import annotations

import copy
import ctypes
import shutil

import pytest
import torch

import leanseq
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.ops import decode, native
from leanseq.ops.quant import Int8Linear, quantize_int8
from leanseq.tasks import get_task

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler"
)

M1 = {"vocab_size": 37, "hidden_size": 24, "num_hidden_layers": 2, "state_size": 8, "time_step_rank": 3}
M2 = {"vocab_size": 37, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "num_heads": 4, "head_dim": 16,
      "n_groups": 1, "chunk_size": 8, "tie_word_embeddings": False}
CONFIGS = {
    "m1": (MambaLM, MambaConfig(**M1)),
    "m1-lti": (MambaLM, MambaConfig(**M1, selective=False)),
    "m1-bias": (MambaLM, MambaConfig(**M1, use_bias=True)),
    "m1-noconvbias-k2": (MambaLM, MambaConfig(**M1, use_conv_bias=False, conv_kernel=2)),
    "m1-untied-resid16": (MambaLM, MambaConfig(**M1, tie_word_embeddings=False, residual_in_fp32=False)),
    "m2": (Mamba2LM, Mamba2Config(**M2)),
    "m2-groups2-limit": (Mamba2LM, Mamba2Config(**{**M2, "n_groups": 2}, time_step_limit=(0.02, 0.05))),
    "m2-bias-noconvbias-tied": (Mamba2LM, Mamba2Config(**{**M2, "tie_word_embeddings": True}, use_bias=True,
                                                       use_conv_bias=False)),
}


@pytest.fixture(autouse=True)
def _reset():
    yield
    decode.set_enabled(None)
    decode.THREADS = None


def make(name, seed=0):
    cls, cfg = CONFIGS[name]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial biases, norms and decays, so every term is exercised
        for n, p in model.named_parameters():
            if n.endswith(("bias", "norm.weight", "norm_f.weight", "D", "_lti")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def step(model, tokens, state, native_on: bool):
    decode.set_enabled(native_on)
    with torch.no_grad():
        return model.step(tokens, state)


def assert_states_close(a, b):
    torch.testing.assert_close(a.conv, b.conv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.position, b.position)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,threads", [(1, 1), (3, 2), (17, 2)])
def test_native_step_equals_eager(name, batch, threads):
    model = make(name)
    decode.THREADS = threads
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _, state = model(torch.randint(0, 37, (batch, 7), generator=g), return_state=True)  # chunked prefill
    eager_state = native_state = state
    for _ in range(4):
        tokens = torch.randint(0, 37, (batch,), generator=g)
        le, eager_state = step(model, tokens, eager_state, False)
        ln, native_state = step(model, tokens, native_state, True)
        torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)
        assert_states_close(native_state, eager_state)
    assert model._native_decode_plan.error is None, model._native_decode_plan.error


@pytest.mark.parametrize("name", ["m1", "m2-groups2-limit"])
def test_batch_256(name):
    model = make(name)
    g = torch.Generator().manual_seed(2)
    state = model.init_state(256)
    for _ in range(2):
        tokens = torch.randint(0, 37, (256,), generator=g)
        le, se = step(model, tokens, state, False)
        ln, sn = step(model, tokens, state, True)
        torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)
        assert_states_close(sn, se)
        state = sn


@pytest.mark.parametrize("name", ["m1", "m2"])
def test_old_state_untouched_and_steps_equal_one_forward(name):
    model = make(name)
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        _, state = model(ids[:, :5], return_state=True)
    before = state.clone()
    decode.set_enabled(True)
    s = state
    with torch.no_grad():
        for t in range(5, 12):
            logits, s = model.step(ids[:, t], s)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)
        model.step(ids[:, 5], state)  # branch again from the old state
    for k, v in before.tensors().items():
        assert torch.equal(v, getattr(state, k)), k


def test_fallbacks_take_the_eager_path():
    model = make("m1")
    state = model.init_state(2)
    tokens = torch.tensor([1, 2])
    decode.set_enabled(False)
    assert decode.try_step(model, tokens, state) is None
    decode.set_enabled(None)
    native.set_enabled(False)  # the scan kernel's switch (LEANSEQ_NATIVE=0) switches this off too
    try:
        assert decode.try_step(model, tokens, state) is None
    finally:
        native.set_enabled(None)
    decode.set_enabled(True)
    with torch.no_grad():
        assert decode.try_step(model, tokens, state) is not None
    # autograd recording with trainable weights: eager, so gradients flow
    with torch.enable_grad():
        assert decode.try_step(model, tokens, state) is None
        logits, _ = model.step(tokens, state)
        assert logits.requires_grad
    # float64 weights: the plan says why, the step still works (eager)
    m64 = make("m2").double()
    with torch.no_grad():
        assert decode.try_step(m64, tokens, m64.init_state(2)) is None
        assert "float64" in m64._native_decode_plan.error
        assert m64.step(tokens, m64.init_state(2))[0].dtype == torch.float64


def test_plan_follows_weight_changes():
    model = make("m1")
    state = model.init_state(1)
    tok = torch.tensor([3])
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.in_proj.weight.mul_(1.5)  # in place: read live, no invalidation needed
        mixer.out_proj.weight.data = torch.randn_like(mixer.out_proj.weight)  # new storage: plan rebuilt
        mixer.x_proj = torch.nn.Linear(mixer.x_proj.in_features, mixer.x_proj.out_features, bias=False)
        mixer.A_log.data[0, 0] = 2.0  # .data write: no version bump, but A is never cached
    for _ in range(2):
        le, _ = step(model, tok, state, False)
        ln, _ = step(model, tok, state, True)
        torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            mixer.dt_proj.bias.add_(0.5)


def test_sizes_are_checked_before_native_code():
    model = make("m2")
    decode.set_enabled(True)
    bad = model.init_state(2)
    bad.ssm = bad.ssm[:, :, :2].contiguous()
    with torch.no_grad(), pytest.raises(ValueError, match="state.ssm has shape"):
        decode.try_step(model, torch.tensor([1, 2]), bad)
    # the C entry checks the range; the error is check_input_ids' own
    with torch.no_grad(), pytest.raises(ValueError, match=r"token_ids holds token id 1000000, outside the vocabulary \[0, 37\)"):
        decode.try_step(model, torch.tensor([1, 10**6]), model.init_state(2))
    plan, lib = model._native_decode_plan, decode.library()
    sizes = (ctypes.c_int64 * 10)(1, 5, 5, 5, 5, 1, 1, 37, 10**6, plan.ptrs.numel())  # wrong conv size
    z = torch.zeros(10**6)
    rc = lib.leanseq_ssm_decode_step(*plan.args_fixed, sizes, 10, torch.tensor([1]).data_ptr(), 1, *[z.data_ptr()] * 8, 1)
    assert rc == 6


def test_int8_native_equals_int8_eager_and_stays_close_to_float32():
    """On the trained induction-heads demo model: int8 logits within 5% of the largest float32 logit and the
    same greedy token in >= 97% of steps (the benchmark prints the measured figures)."""
    model = leanseq.load(leanseq.__path__[0] + "/data/induction-mamba")
    inputs = get_task("induction_heads", seq_len=64).generate(4, torch.Generator().manual_seed(0)).inputs
    q = quantize_int8(copy.deepcopy(model))
    # the tied embeddings read the int8 head's rows (one int8 copy), in the native kernel and the eager step
    assert isinstance(q.lm_head, Int8Linear) and q.backbone.embeddings.qweight is q.lm_head.qweight
    prompt, rest = inputs[:, :48], inputs[:, 48:]
    with torch.no_grad():
        _, sf = model(prompt, return_state=True)
        _, sq = q(prompt, return_state=True)
    se, sn = sq, sq
    agree = total = 0
    max_err = 0.0
    for t in range(rest.shape[1]):
        tok = rest[:, t]
        lf, sf = step(model, tok, sf, True)
        le, se = step(q, tok, se, False)
        ln, sn = step(q, tok, sn, True)
        torch.testing.assert_close(ln, le, rtol=1e-4, atol=1e-4)  # same int8 weights, two kernels
        max_err = max(max_err, float((ln - lf).abs().max() / lf.abs().max()))
        agree += int((ln.argmax(-1) == lf.argmax(-1)).sum())
        total += tok.numel()
    assert max_err < 0.05, max_err  # relative to the largest float32 logit
    assert agree / total >= 0.97, agree / total


def test_int8_generate_and_prefill_mamba2():
    model = make("m2")
    q = quantize_int8(copy.deepcopy(model), include_small=True)
    ids = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lf, lq = model(ids), q(ids)
    assert float((lq - lf).abs().max()) < 0.05 * float(lf.abs().max())
    decode.set_enabled(True)
    out_native = q.generate(ids, 6, temperature=0)
    decode.set_enabled(False)
    out_eager = q.generate(ids, 6, temperature=0)
    assert torch.equal(out_native, out_eager)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 37])
@pytest.mark.parametrize("kernel", [True, False])
def test_int8_linear_equals_its_dequantised_float_layer(rows, kernel):
    """Whichever route Int8Linear takes (the int8 matrix-vector kernel for a few rows, a dequantised matmul
    otherwise, or with the kernel off), it computes x @ dequantize().T + bias."""
    torch.manual_seed(rows)
    lin = Int8Linear.from_float(torch.randn(48, 40), bias=torch.randn(48))
    x = torch.randn(rows, 40)
    decode.set_enabled(kernel)
    try:
        with torch.no_grad():
            got = lin(x)
    finally:
        decode.set_enabled(None)
    want = torch.nn.functional.linear(x, lin.dequantize(), lin.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
