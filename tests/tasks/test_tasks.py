import random
import tempfile
from pathlib import Path

import pytest
import torch

from leanseq.tasks import (
    IGNORE_INDEX,
    MQAR_PRESETS,
    TASKS,
    InductionHeadsConfig,
    MQARConfig,
    SelectiveCopyingConfig,
    accuracy,
    get_task,
)


def _byte_folder() -> str:
    """A bytes_lm folder source (train.txt, validation.txt) of seeded random text, for the shared tests."""
    folder = Path(tempfile.mkdtemp(prefix="leanseq-bytes-lm-"))
    rng = random.Random(0)
    for split in ("train", "validation"):
        (folder / f"{split}.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    return str(folder)


SMALL = {
    "selective_copying": {"seq_len": 64, "num_tokens_to_copy": 8},
    "induction_heads": {"seq_len": 32},
    "mqar": {"seq_len": 64, "num_kv_pairs": 4, "vocab_size": 256},
    "bytes_lm": {"seq_len": 32, "source": _byte_folder()},
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_are_deterministic_and_seed_dependent(name):
    task = get_task(name, **SMALL[name])
    a = [next(iter(task.batches(4, seed=7))) for _ in range(2)]
    it1, it2, it3 = task.batches(4, seed=7), task.batches(4, seed=7), task.batches(4, seed=8)
    for _ in range(3):
        b1, b2, b3 = next(it1), next(it2), next(it3)
        for x, y in zip(b1, b2):
            assert torch.equal(x, y)
        assert not torch.equal(b1.inputs, b3.inputs)
    assert torch.equal(a[0].inputs, a[1].inputs)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_leaves_global_rng_alone_and_layout_is_consistent(name):
    task = get_task(name, **SMALL[name])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    inputs, targets, mask = next(task.batches(3, seed=0))
    assert torch.equal(before, torch.get_rng_state())
    L = task.total_len
    assert inputs.shape == targets.shape == mask.shape == (3, L)
    assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(mask, targets != IGNORE_INDEX)
    assert inputs.min() >= 0 and inputs.max() < task.vocab_size
    assert targets[mask].min() >= 0 and targets[mask].max() < task.vocab_size


@pytest.mark.parametrize("name", sorted(TASKS))
def test_iterator_state_dict_resumes_the_stream(name):
    task = get_task(name, **SMALL[name])
    it = task.batches(2, seed=3)
    next(it)
    saved = it.state_dict()
    expected = next(it)
    other = task.batches(2, seed=99)
    other.load_state_dict(saved)
    assert torch.equal(next(other).inputs, expected.inputs)


def test_selective_copying_answers_are_the_data_tokens_in_order():
    task = SelectiveCopyingConfig(seq_len=100, num_tokens_to_copy=10, vocab_size=16)
    inputs, targets, mask = next(task.batches(5, seed=1))
    assert inputs.shape == (5, 110)
    for row in range(5):
        context = inputs[row, :100]
        data = context[context != 0]
        assert len(data) == 10
        assert (data < 15).all() and (data >= 1).all()
        assert torch.equal(targets[row, 100:], data)
        assert (inputs[row, 100:] == 15).all()
        assert mask[row, 100:].all() and not mask[row, :100].any()


def test_selective_copying_paper_defaults():
    task = SelectiveCopyingConfig()
    assert (task.seq_len, task.vocab_size, task.num_tokens_to_copy) == (4096, 16, 16)
    inputs, _targets, mask = next(task.batches(2, seed=0))
    assert inputs.shape == (2, 4096 + 16) and int(mask.sum()) == 32


@pytest.mark.parametrize("seq_len", [3, 4, 17, 256, 2**20])
def test_induction_heads_trigger_twice_and_answer_follows_first(seq_len):
    task = InductionHeadsConfig(seq_len=seq_len)
    batch = 64 if seq_len < 1000 else 2
    inputs, targets, mask = next(task.batches(batch, seed=seq_len))
    trigger = task.trigger_token
    assert ((inputs == trigger).sum(dim=1) == 2).all()
    assert (inputs[:, -1] == trigger).all()
    first = (inputs == trigger).int().argmax(dim=1)
    assert (first <= seq_len - 3).all()
    assert torch.equal(targets[:, -1], inputs[torch.arange(batch), first + 1])
    assert mask.sum() == batch and mask[:, -1].all()


def test_induction_heads_defaults_match_paper():
    task = get_task("induction_heads")
    assert (task.vocab_size, task.seq_len) == (16, 256)


@pytest.mark.parametrize("seq_len,num_kv_pairs", MQAR_PRESETS)
def test_mqar_queries_recall_their_values(seq_len, num_kv_pairs):
    task = MQARConfig(seq_len=seq_len, num_kv_pairs=num_kv_pairs)
    assert task.vocab_size == 8192 and task.power_a == 0.01
    inputs, targets, mask = next(task.batches(8, seed=0))
    assert inputs.shape == (8, seq_len)
    n = num_kv_pairs
    for row in range(8):
        keys, values = inputs[row, 0 : 2 * n : 2], inputs[row, 1 : 2 * n : 2]
        assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
        assert (keys >= 1).all() and (keys < 4096).all() and (values >= 4096).all()
        positions = mask[row].nonzero().flatten()
        assert len(positions) == n and (positions >= 2 * n).all() and ((positions - 2 * n) % 2 == 0).all()
        lookup = dict(zip(keys.tolist(), values.tolist()))
        for p in positions.tolist():
            assert targets[row, p].item() == lookup[inputs[row, p].item()]
        assert sorted(inputs[row, positions].tolist()) == sorted(keys.tolist())


def test_mqar_power_law_puts_queries_near_the_context():
    near_fraction = {}
    for power_a in (0.01, 1.0):
        task = MQARConfig(seq_len=256, num_kv_pairs=4, power_a=power_a, vocab_size=1024)
        _, _, mask = next(task.batches(512, seed=0))
        gaps = (mask.nonzero()[:, 1] - 8) // 2  # slot index, 0 .. 123
        near_fraction[power_a] = (gaps < 12).float().mean().item()
    # alpha=1 is uniform (about 10% in the first 12 of 124 slots); alpha=0.01 concentrates there
    assert 0.05 < near_fraction[1.0] < 0.15
    assert near_fraction[0.01] > 0.5


def test_mqar_without_random_fill_uses_zero_between_queries():
    task = MQARConfig(seq_len=32, num_kv_pairs=2, vocab_size=64, random_non_queries=False)
    inputs, _, mask = next(task.batches(4, seed=0))
    rest = inputs[:, 4:][~mask[:, 4:]]
    assert (rest == 0).all()


def test_bad_settings_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown task 'induction_head'; did you mean 'induction_heads'"):
        get_task("induction_head")
    with pytest.raises(ValueError, match="unknown key 'seq_length'; did you mean 'seq_len'"):
        get_task("mqar", seq_length=64)
    with pytest.raises(ValueError, match="num_tokens_to_copy"):
        SelectiveCopyingConfig(seq_len=4, num_tokens_to_copy=8)
    with pytest.raises(ValueError, match="seq_len"):
        MQARConfig(seq_len=8, num_kv_pairs=4)
    with pytest.raises(TypeError, match="induction_heads.seq_len must be an integer"):
        InductionHeadsConfig(seq_len="256")
    with pytest.raises(ValueError, match="power_a"):
        MQARConfig(power_a=0)
    with pytest.raises(ValueError, match="batch_size"):
        InductionHeadsConfig().generate(0, torch.Generator())


def test_accuracy_counts_masked_positions_per_token():
    targets = torch.tensor([[IGNORE_INDEX, 2, 1], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = 1.0  # right
    logits[0, 2, 3] = 1.0  # wrong
    logits[1, 2, 0] = 1.0  # right
    logits[0, 0, 3] = 5.0  # unmasked, ignored
    assert accuracy(logits, targets) == pytest.approx(2 / 3)
    mask = targets != IGNORE_INDEX
    assert accuracy(logits, targets, mask) == pytest.approx(2 / 3)
    only_second_row = mask & torch.tensor([[False], [True]])
    assert accuracy(logits, targets, only_second_row) == 1.0
    with pytest.raises(ValueError, match="no positions"):
        accuracy(logits, targets, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="targets shape"):
        accuracy(logits, targets[:, :2])
