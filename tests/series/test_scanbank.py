"""leanseq.series.scanbank: an untrained scan bank that streams exactly, and a ridge head that learns from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanseq.series.scanbank import ScanBank, ScanBankClassifier, ScanBankConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_bank(channels=3, seed=1, **kw):
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(int(rng.integers(10, 30)), channels)) for _ in range(12)]
    config = ScanBankConfig(channels=channels, width=128, group_width=16, timescale=30, **kw)
    return ScanBank(config, seed=seed).fit(train), train


def test_step_by_step_and_chunks_equal_one_pass_with_missing_values():
    bank, _ = small_bank()
    x = torch.randn(2, 20, 3)
    x[0, 4, 1] = float("nan")  # a missing observation in one channel
    whole, end_state = bank(x, return_state=True)
    assert whole.shape == (2, bank.num_features) and torch.isfinite(whole).all()
    _, state = bank(x[:, :7], return_state=True)
    torch.testing.assert_close(bank(x[:, 7:], state=state), whole, atol=1e-5, rtol=1e-5)
    state = bank.init_state(2)
    for t in range(20):
        feats, new = bank.step(x[:, t], state)
        assert new is not state  # step is pure: the old state stays valid
        state = new
    torch.testing.assert_close(feats, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.ssm, end_state.ssm, atol=1e-4, rtol=1e-4)


def test_reading_at_a_cut_is_reading_only_that_prefix():
    bank, _ = small_bank()
    x = torch.randn(2, 16, 3)
    at = bank(x, read_at=torch.tensor([[3, 15], [9, 0]]))  # (B, P, F) from the one pass
    torch.testing.assert_close(at[0, 0], bank(x[:1, :4])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at[1, 0], bank(x[1:, :10])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at[1, 1], bank(x[1:, :1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="read_at"):
        bank(x, read_at=torch.tensor([[16], [0]]))


def test_nothing_is_trained_and_the_seed_fixes_the_bank():
    a, train = small_bank(seed=3)
    b = ScanBank(a.config, seed=3).fit(train)
    c = ScanBank(a.config, seed=4).fit(train)
    assert list(a.parameters()) == []  # every weight is a fixed buffer
    x = torch.randn(1, 12, 3)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    # fitted from the data without labels: a per-channel normaliser and PPV thresholds inside the responses
    flat = np.concatenate(train)
    torch.testing.assert_close(a.value_mean, torch.from_numpy(flat.mean(0)).float())
    assert (a.threshold != 0).all()
    ppv = a(x)[0, 2 * a.config.width : 3 * a.config.width]
    assert ((ppv >= 0) & (ppv <= 1)).all()


def test_bad_input_and_state_are_refused():
    bank, _ = small_bank()
    with pytest.raises(ValueError, match="channels"):
        bank(torch.randn(1, 5, 2))
    with pytest.raises(ValueError, match="infinite"):
        bank(torch.tensor([[[1.0, float("inf"), 0.0]]]))
    with pytest.raises(ValueError, match="state.conv"):
        bank.step(torch.randn(2, 3), bank.init_state(3))
    with pytest.raises(ValueError, match="group_width"):
        ScanBankConfig(width=100, group_width=32).check()
    with pytest.raises(ValueError, match="channel"):
        ScanBank(ScanBankConfig(channels=2, width=64)).fit([np.full((5, 2), np.nan)])


def test_ridge_head_learns_and_classifier_streams():
    rng = np.random.default_rng(1)
    # class 0: a slow rise; class 1: a rise then a fall: the same values, a different shape in time
    ramp = np.linspace(0, 1, 24)
    shapes = [ramp, np.minimum(ramp, 1 - ramp) * 2]
    labels = np.array([0, 1] * 20)
    series = [(shapes[k] + rng.normal(0, 0.1, 24))[:, None] for k in labels]
    bank = ScanBank(ScanBankConfig(channels=1, width=256, timescale=24), seed=0).fit(series[:30])
    model = ScanBankClassifier(bank, 2)
    x = torch.from_numpy(np.stack(series)).float()
    feats = bank(x[:30], read_at=torch.tensor([[23, 11]] * 30)).numpy()  # full length and 50%
    head = model.fit_head(feats, labels[:30])
    assert head["alpha"] > 0 and head["pools"] and head["cv_accuracy"] >= 80
    assert (model(x[30:]).argmax(-1).numpy() == labels[30:]).mean() >= 0.9
    state = model.init_state(10)
    for t in range(24):
        logits, state = model.step(x[30:, t], state, at_end=t == 23)
    torch.testing.assert_close(logits, model(x[30:]), atol=1e-3, rtol=1e-3)


def test_cross_validation_drops_cut_rows_only_when_they_mislead():
    # features of 40 series read at their full length and at one cut: the class shows in feature 0 at full length;
    # at the cut it shows reversed (a prefix that looks like the other class's whole series, as on short series
    # whose class is *when* a peak falls) or the same (a class visible early)
    rng = np.random.default_rng(2)
    labels = np.array([0, 1] * 20)
    sign = 2.0 * labels - 1
    bank = ScanBank(ScanBankConfig(channels=1, width=32, group_width=16, timescale=8), seed=0)
    feats = rng.normal(0, 1, (40, 2, bank.num_features))
    feats[:, 0, 0] += 5 * sign
    misleading, consistent = feats.copy(), feats.copy()
    misleading[:, 1, 0] -= 10 * sign
    consistent[:, 1, 0] += 5 * sign
    head = ScanBankClassifier(bank, 2).fit_head(misleading, labels, choices=(("max",),))
    assert head["cuts"] == 1 and head["cv_accuracy"] >= 75  # the full-length rows alone
    head = ScanBankClassifier(bank, 2).fit_head(consistent, labels, choices=(("max",),))
    assert head["cuts"] == 2 and head["cv_accuracy"] >= 75  # kept: they calibrate the anytime answers
    with_cuts_only = ScanBankClassifier(bank, 2).fit_head(misleading, labels, choices=(("max",),), cut_choices=(None,))
    assert with_cuts_only["cuts"] == 2 and with_cuts_only["cv_accuracy"] < 60  # near chance: the rows contradict
    with pytest.raises(ValueError, match="cut_choices"):
        ScanBankClassifier(bank, 2).fit_head(misleading, labels, cut_choices=(0,))


def test_anytime_head_answers_cuts_and_final_head_answers_the_end():
    # at full length the class shows in feature 0; at the cut it shows in feature 1 and reversed in feature 0, so
    # CV fits the final head on full-length rows alone and the answers before the end come from a second head
    # fitted on every cut (a real bank underneath, so streaming can be checked against one pass)
    rng = np.random.default_rng(3)
    bank, _ = small_bank(channels=1)
    x = torch.from_numpy(rng.normal(size=(40, 12, 1))).float()
    labels = np.array([0, 1] * 20)
    feats = bank(x, read_at=torch.tensor([[11, 5]] * 40)).numpy()  # (40, 2, F): full length and 50%
    sign = 2.0 * labels - 1
    feats[:, 0, 0] += 50 * sign
    feats[:, 1, 0] -= 50 * sign
    feats[:, 1, 1] += 50 * sign
    model = ScanBankClassifier(bank, 2)
    info = model.fit_head(feats, labels, choices=(("max",),))
    assert info["cuts"] == 1 and info["anytime"] == {"alpha": info["anytime"]["alpha"], "pools": ["max"], "cuts": 2}
    assert model.anytime_head is not None and not torch.equal(model.anytime_head.weight, model.head.weight)
    assert model.num_head_parameters() == 2 * sum(p.numel() for p in model.head.parameters())  # both are counted
    t = torch.from_numpy(feats)
    pred_cut = model.anytime_head(t[:, 1]).argmax(-1).numpy()
    assert (pred_cut == labels).mean() >= 0.9  # the anytime head reads the cuts right ...
    assert (model.head(t[:, 1]).argmax(-1).numpy() == labels).mean() <= 0.1  # ... where the final head reverses them
    assert (model.head(t[:, 0]).argmax(-1).numpy() == labels).mean() >= 0.9
    # the API: cuts and stream prefixes go to the anytime head, whole series to the final head
    at = torch.tensor([[5, 11]] * 4)
    torch.testing.assert_close(model(x[:4], read_at=at, at_end=False), model.anytime_head(bank(x[:4], read_at=at)))
    torch.testing.assert_close(model(x[:4]), model.head(bank(x[:4])))
    state = model.init_state(4)
    for step in range(12):
        so_far, _ = model.step(x[:4, step], state)  # the answer so far: anytime head
        scores, state = model.step(x[:4, step], state, at_end=step == 11)
        if step == 5:
            torch.testing.assert_close(scores, model(x[:4, :6], at_end=False), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(so_far, model(x[:4], at_end=False), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(scores, model(x[:4]), atol=1e-3, rtol=1e-3)  # the end: the final head
    # chunks carry the state: the final head after the last chunk equals one pass
    _, chunk_state = model(x[:4, :7], return_state=True, at_end=False)
    torch.testing.assert_close(model(x[:4, 7:], state=chunk_state), model(x[:4]), atol=1e-4, rtol=1e-4)


def test_one_head_when_cross_validation_keeps_every_cut():
    rng = np.random.default_rng(4)
    labels = np.array([0, 1] * 20)
    bank = ScanBank(ScanBankConfig(channels=1, width=32, group_width=16, timescale=8), seed=0)
    feats = rng.normal(0, 1, (40, 2, bank.num_features))
    feats[:, :, 0] += 5 * (2.0 * labels - 1)[:, None]  # the class shows at the cut as at the end
    model = ScanBankClassifier(bank, 2)
    info = model.fit_head(feats, labels, choices=(("max",),))
    assert info["cuts"] == 2 and info["anytime"] is None and model.anytime_head is None  # stored once
    assert model.head_for(at_end=False) is model.head_for(at_end=True) is model.head
    assert model.num_head_parameters() == sum(p.numel() for p in model.head.parameters())
    x = torch.randn(3, 9, 1)
    torch.testing.assert_close(model(x, at_end=False), model(x))


def test_ensemble_head_is_the_average_of_its_members_fitted_alone():
    # a bank of 64 channels read as 2 members of 32: each member's ridge fit on its own channels alone, with the
    # same choice, and the ensemble's scores are the mean of theirs (one linear head on all the features)
    rng = np.random.default_rng(5)
    labels = np.array([0, 1, 2] * 12)
    wide = ScanBank(ScanBankConfig(channels=1, width=64, group_width=16, timescale=8), seed=0)
    half = ScanBank(ScanBankConfig(channels=1, width=32, group_width=16, timescale=8), seed=0)
    feats = rng.normal(0, 1, (36, 2, wide.num_features))
    feats[:, :, :3] += 4.0 * labels[:, None, None]  # member 0 sees the class, member 1 noise
    fixed = {"choices": (("max", "last"),), "alphas": (30.0,), "cut_choices": (None,)}
    ensemble = ScanBankClassifier(wide, 3)
    info = ensemble.fit_head(feats, labels, members=2, **fixed)
    assert info["members"] == 2 and info["cv_accuracy"] > 50
    probe = torch.from_numpy(rng.normal(0, 1, (5, wide.num_features))).float()
    member_scores = []
    for m in range(2):  # member m: channels 32 m .. 32 m + 31 of every block
        cols = np.concatenate([np.arange(b * 64 + 32 * m, b * 64 + 32 * (m + 1)) for b in range(4)])
        alone = ScanBankClassifier(half, 3)
        alone.fit_head(feats[:, :, cols], labels, **fixed)
        member_scores.append(alone.head(probe[:, cols]))
    torch.testing.assert_close(ensemble.head(probe), (member_scores[0] + member_scores[1]) / 2, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="members"):
        ensemble.fit_head(feats, labels, members=3)


def test_raw_block_streams_exactly_and_holds_only_what_was_read():
    # the first 8 normalised values and their differences ride in the state: step by step, chunks and cuts read
    # from one pass equal one pass over the prefix; nothing of an unread step leaks into the block
    bank, _ = small_bank(raw_steps=8)
    assert bank.raw_width == (8 + 7) * 3 and bank.num_features == 4 * 128 + bank.raw_width
    x = torch.randn(2, 20, 3)
    x[0, 4, 1] = float("nan")  # missing: 0 in the block, as the scan reads it
    whole = bank(x)
    _, state = bank(x[:, :3], return_state=True)  # a chunk boundary inside the kept steps
    torch.testing.assert_close(bank(x[:, 3:], state=state), whole, atol=1e-5, rtol=1e-5)
    state = bank.init_state(2)
    for t in range(20):
        feats, state = bank.step(x[:, t], state)
        if t == 4:
            torch.testing.assert_close(feats, bank(x[:, :5]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats, whole, atol=1e-4, rtol=1e-4)
    at = bank(x, read_at=torch.tensor([[2, 19], [5, 0]]))
    torch.testing.assert_close(at[0, 0], bank(x[:1, :3])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at[1, 0], bank(x[1:, :6])[0], atol=1e-5, rtol=1e-5)
    raw = bank(x[1:, :3])[0, 4 * 128 :]  # 3 observations read
    values, diffs = raw[: 8 * 3].reshape(8, 3), raw[8 * 3 :].reshape(7, 3)
    normalised = (x[1, :3] - bank.value_mean) / bank.value_std
    torch.testing.assert_close(values[:3], normalised)
    torch.testing.assert_close(diffs[:2], normalised[1:] - normalised[:-1])
    assert not values[3:].any() and not diffs[2:].any()
    with pytest.raises(ValueError, match="raw_steps"):
        ScanBankConfig(raw_steps=-1).check()


def test_cross_validation_adds_the_raw_block_when_it_carries_the_class():
    # pool features are noise; the class shows in the raw block only: the CV picks a readout with "raw", and a
    # bank without the block cannot be offered it
    rng = np.random.default_rng(6)
    labels = np.array([0, 1] * 20)
    bank = ScanBank(ScanBankConfig(channels=1, width=32, group_width=16, timescale=8, raw_steps=6), seed=0)
    feats = rng.normal(0, 1, (40, 2, bank.num_features))
    feats[:, :, 4 * 32 + 2] += 3 * (2.0 * labels - 1)[:, None]  # the third value kept
    info = ScanBankClassifier(bank, 2).fit_head(feats, labels)
    assert "raw" in info["pools"] and info["cv_accuracy"] >= 85
    without = ScanBankClassifier(bank, 2).fit_head(feats, labels, choices=(("max", "mean", "ppv"), ("last",)))
    assert without["cv_accuracy"] < info["cv_accuracy"] - 20
    plain = ScanBank(ScanBankConfig(channels=1, width=32, group_width=16, timescale=8), seed=0)
    with pytest.raises(ValueError, match="lacks"):
        ScanBankClassifier(plain, 2).fit_head(feats[:, :, : plain.num_features], labels, choices=(("ppv", "raw"),))
