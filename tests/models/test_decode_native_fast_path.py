"""The tiny-model fast path of model.step (native kernel): what it skips it still guarantees.

The token range is left to the C entry (its refusal becomes check_input_ids' own error), a state the model
returned skips validation only while untouched, and the plan notices every way weights can be swapped.
"""

from __future__ import annotations

import importlib.resources

import pytest
import torch

import leanseq
from leanseq.ops import decode


@pytest.fixture
def model():
    decode.set_enabled(True)
    if decode.library() is None:
        pytest.skip(decode.status())
    yield leanseq.load(str(importlib.resources.files("leanseq") / "data" / "induction-mamba"))
    decode.set_enabled(None)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("bad", [99, -1, 16])
def test_bad_token_id_gives_the_clear_message_on_both_paths(model, native, bad):
    decode.set_enabled(native)
    state = model.init_state(2)
    message = rf"token_ids holds token id {bad}, outside the vocabulary \[0, 16\)"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model.step(torch.tensor([3, bad]), state)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model.step(torch.tensor([3, bad], dtype=torch.int32), state)  # converted ids too
    with torch.no_grad():  # the state is untouched and still usable
        model.step(torch.tensor([3, 4]), state)


def test_token_types_and_shapes_are_still_checked_before_the_kernel(model):
    state = model.init_state(1)
    with torch.no_grad():
        with pytest.raises(TypeError, match="integer token ids"):
            model.step(torch.tensor([1.0]), state)
        with pytest.raises(ValueError, match="shape"):
            model.step(torch.tensor([[1]]), state)
        with pytest.raises(ValueError, match="batch size"):
            model.step(torch.tensor([1, 2]), state)


def _stepped(model):
    with torch.no_grad():
        _, state = model.step(torch.tensor([3]), model.init_state(1))
    assert state._vouched_for(model)
    return state


def _nan_in_place(state):
    state.ssm[0, 0, 0, 0] = float("nan")


def _nan_replaced(state):
    conv = state.conv.clone()
    conv[0, 0, 0, 0] = float("inf")
    state.conv = conv


def _nan_position(state):
    state.position = torch.tensor([-1])


@pytest.mark.parametrize("change", [_nan_in_place, _nan_replaced, _nan_position])
def test_a_vouched_state_changed_afterwards_is_validated_again(model, change):
    state = _stepped(model)
    change(state)
    assert not state._vouched_for(model)
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or infinite|positions must be >= 0"):
        model.step(torch.tensor([3]), state)


def test_a_vouched_state_lapses_when_the_model_changes_dtype(model):
    state = _stepped(model)
    model.double()
    assert not state._vouched_for(model)
    with torch.no_grad(), pytest.raises(TypeError, match="dtype"):
        model.step(torch.tensor([3]), state)


def test_the_returned_state_is_new_and_the_input_untouched(model):
    state = _stepped(model)
    before = state.clone()
    with torch.no_grad():
        _, new = model.step(torch.tensor([5]), state)
    assert new is not state and all(new.tensors()[k] is not v for k, v in state.tensors().items())
    for k, v in before.tensors().items():
        assert torch.equal(v, getattr(state, k)), k
    assert state._vouched_for(model) and new._vouched_for(model)


def _data_other(m):
    w = m.backbone.layers[0].mixer.in_proj.weight
    w.data = w.data.clone()


def _data_transposed_view(m):
    a = m.backbone.layers[1].mixer.A_log
    a.data = a.data.t()  # same address, other layout


def _data_expanded_view(m):
    d = m.backbone.layers[0].mixer.D
    d.data = d.data.as_strided(d.shape, (0,))


def _data_narrowed_view(m):
    w = m.backbone.layers[1].mixer.out_proj.weight
    w.data = w.data[: w.shape[0] // 2]  # same address, fewer rows


def _data_reshaped_view(m):
    w = m.backbone.layers[0].mixer.in_proj.weight
    w.data = w.data.view(w.shape[1], w.shape[0])  # same address, contiguous, other shape


def _data_other_dtype(m):
    d = m.backbone.layers[1].mixer.D
    d.requires_grad_(False)  # (a tensor that requires grad cannot take integer data)
    d.data = d.data.view(torch.int32)  # same address, shape and strides; other bits


def _replaced_module(m):
    old = m.backbone.layers[0].mixer.x_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    new.load_state_dict(old.state_dict())
    m.backbone.layers[0].mixer.x_proj = new


def _assign(m):
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)


def _to(m):
    m.to(torch.float64).to(torch.float32)


def _deleted(m):
    del m.backbone.layers[0].mixer.x_proj


_SWAPS = [_data_other, _data_transposed_view, _data_expanded_view, _data_narrowed_view, _data_reshaped_view,
          _data_other_dtype, _replaced_module, _assign, _to, _deleted]


@pytest.mark.parametrize("guarded", [True, False])
@pytest.mark.parametrize("change", _SWAPS)
def test_plan_is_stale_after_every_kind_of_swap(model, change, guarded):
    _stepped(model)
    plan = model._native_decode_plan
    assert (plan.layout_guard is not None) == (decode._layout_guard(plan.tensors) is not None)
    if not guarded:
        plan.layout_guard = None  # the exact Python comparison alone (a torch without TensorGuards)
    assert plan.fresh()
    change(model)
    assert not plan.fresh()


def test_layout_guard_saying_no_falls_back_to_the_exact_comparison(model):
    _stepped(model)
    plan = model._native_decode_plan
    with torch.inference_mode():  # the guard compares dispatch keys too: it says no here, the layouts agree
        assert plan.fresh()
        model.step(torch.tensor([3]), model.init_state(1))
    assert model._native_decode_plan is plan
    plan.layout_guard = lambda *tensors: False
    assert plan.fresh()


def test_plan_notices_requires_grad_switched_on_after_build(model):
    model.requires_grad_(False)
    state = _stepped(model)
    model.requires_grad_(True)
    with torch.enable_grad():
        assert decode.try_step(model, torch.tensor([3]), state) is None  # eager, so gradients flow
        logits, _ = model.step(torch.tensor([3]), state)
    assert logits.requires_grad


def test_native_and_eager_agree_through_the_fast_path(model):
    ids = torch.randint(0, 16, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def _native_and_eager(model, tok, state):
    """One step from `state` on each path (the state is not modified by either)."""
    with torch.no_grad():
        decode.set_enabled(True)
        native = model.step(tok, state)
        decode.set_enabled(False)
        eager = model.step(tok, state)
        decode.set_enabled(True)
    return native, eager


def _assert_steps_agree(native, eager):
    torch.testing.assert_close(native[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(native[1].ssm, eager[1].ssm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_log_written_between_steps_is_seen_by_the_next(model, threads):
    """The kernel caches A = -exp(A_log): every kind of write to A_log (through .data, in place under no_grad,
    a single element, then back to the old bytes) must be seen by the very next step, whatever thread split."""
    decode.THREADS = threads
    try:
        a_log = model.backbone.layers[1].mixer.A_log
        original = a_log.detach().clone()
        tok = torch.tensor([5])
        with torch.no_grad():
            _, state = model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), return_state=True)
            model.step(tok, state)  # the cache is filled
        writes = [lambda: a_log.data[5:90].fill_(0.5),  # through .data: no version bump
                  lambda: a_log.data.mul_(0.5),
                  lambda: a_log.detach().add_(1.0),  # the same memory through another tensor object
                  lambda: a_log.data.copy_(original),  # back to the bytes the cache was first filled from
                  lambda: a_log.mul_(1.5)]  # in place under no_grad: a version bump, the same memory
        with torch.no_grad():
            for write in writes:
                before = model.step(tok, state)[1].ssm[1]
                write()
                native, eager = _native_and_eager(model, tok, state)
                _assert_steps_agree(native, eager)
                assert not torch.allclose(native[1].ssm[1], before, atol=1e-4)  # the write matters: a stale A shows
                state = native[1]
    finally:
        decode.THREADS = None


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_scan_and_row_blocks_with_remainders_equal_eager(threads, batch):
    """16-state scans take 16 channels at a time, short rows 16 at a time: sizes that leave remainders (48
    channels split over 1-3 threads; 96, 34, 24 and 37 rows) must still equal the eager step."""
    from leanseq.models.mamba import MambaConfig, MambaLM

    decode.set_enabled(True)
    if decode.library() is None:
        pytest.skip(decode.status())
    torch.manual_seed(0)
    m = MambaLM(MambaConfig(vocab_size=37, hidden_size=24, num_hidden_layers=2, state_size=16,
                            time_step_rank=2)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("bias", "norm.weight", "norm_f.weight", "D")):
                p.add_(torch.randn_like(p) * 0.3)
        _, state = m(torch.randint(0, 37, (batch, 5)), return_state=True)
    decode.THREADS = threads
    try:
        for t in range(3):
            native, eager = _native_and_eager(m, torch.tensor([3, 7, 33][:batch]) + t, state)
            _assert_steps_agree(native, eager)
            state = native[1]
    finally:
        decode.THREADS = None
        decode.set_enabled(None)


@pytest.mark.parametrize("cols", [5, 64, 100, 256, 300])
@pytest.mark.parametrize("rows", [16, 37, 64])
@pytest.mark.parametrize("int8", [False, True])
def test_gemv_short_and_long_rows(rows, cols, int8):
    decode.set_enabled(True)
    if decode.library() is None:
        pytest.skip(decode.status())
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(1, cols, generator=g)
    if int8:
        w = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
        scale = torch.rand(rows, generator=g) / 64
        got, want = decode.gemv(w, x, scale), x @ (w.float() * scale[:, None]).T
    else:
        w = torch.randn(rows, cols, generator=g)
        got, want = decode.gemv(w, x), x @ w.T
    decode.set_enabled(None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_vouched_state_whose_data_was_swapped_is_still_checked(model):
    """`t.data = other` keeps the tensor object and its version, so the state stays vouched for; the step's own
    guard still refuses a wrong shape and copes with a non-contiguous layout."""
    state = _stepped(model)
    reference = state.clone()
    state.conv.data = state.conv.data.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided
    assert state._vouched_for(model) and not state.conv.is_contiguous()
    with torch.no_grad():
        got = model.step(torch.tensor([4]), state)
        want = model.step(torch.tensor([4]), reference)
    torch.testing.assert_close(got[0], want[0])
    state.ssm.data = torch.zeros(2, 1, 128, 8)  # half the state size
    with torch.no_grad(), pytest.raises(ValueError, match=r"state.ssm has shape \(2, 1, 128, 8\)"):
        model.step(torch.tensor([4]), state)


def test_plan_shortcut_rearms_after_a_harmless_change_and_still_sees_swaps(model):
    _stepped(model)
    plan = model._native_decode_plan
    model.backbone.layers[0].mixer.register_buffer("unused", torch.zeros(1))  # a new key: not read by the kernel
    assert plan.fresh() and plan.fresh()
    if decode._dict_version is not None:
        assert plan.dict_versions == tuple(map(decode._dict_version, plan.dicts))  # the shortcut holds again
    _replaced_module(model)
    assert not plan.fresh()


def test_inference_mode_states_step_inside_and_outside_it(model):
    ids = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        want, _ = model(ids[None], return_state=True)
    with torch.inference_mode():
        state = model.init_state(1)
        for t in range(3):
            logits, state = model.step(ids[t:t + 1], state)
            assert state._vouched_for(model)
            torch.testing.assert_close(logits[0], want[0, t], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # inference tensors stepped outside inference mode
        for t in range(3, 5):
            logits, state = model.step(ids[t:t + 1], state)
            torch.testing.assert_close(logits[0], want[0, t], rtol=1e-4, atol=1e-4)
        assert state._vouched_for(model)
