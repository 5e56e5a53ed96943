import math

import pytest
import torch

from leanseq.tasks import TASKS, BytesLMConfig, get_task
from leanseq.tasks.bytes_lm import load_source
from leanseq.train import OutputSection, Trainer, TrainSection

TRAIN = ("To be, or not to be, that is the question: " * 40).encode()
VALID = "Ünïcödé validation — ✓ ".encode() * 20


@pytest.fixture
def source(tmp_path):
    (tmp_path / "train.txt").write_bytes(TRAIN)
    (tmp_path / "validation.txt").write_bytes(VALID)
    return str(tmp_path)


def test_registered_and_windows_are_shifted_copies_of_the_text(source):
    assert TASKS["bytes_lm"] is BytesLMConfig
    task = get_task("bytes_lm", source=source, seq_len=16)
    inputs, targets, mask = next(task.batches(8, seed=0))
    assert inputs.shape == targets.shape == mask.shape == (8, 16) and mask.all()
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row in range(8):
        window = bytes(inputs[row].tolist()) + bytes([int(targets[row, -1])])
        assert window in TRAIN


def test_deterministic_and_held_out_from_validation(source):
    task = BytesLMConfig(source=source, seq_len=12)
    a, b = next(task.batches(4, seed=5)), next(task.batches(4, seed=5))
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, next(task.batches(4, seed=6)).inputs)
    held = next(task.held_out_batches(4, seed=5))
    for row in held.inputs:
        assert bytes(row.tolist()) in VALID
    assert torch.equal(held.inputs, next(task.held_out_batches(4, seed=5)).inputs)


def test_eval_metrics_units(source):
    task = BytesLMConfig(source=source, seq_len=32)
    batch = next(task.held_out_batches(4, seed=0))
    metrics = task.eval_metrics(math.log(2), [batch])
    assert metrics["eval_bits_per_byte"] == pytest.approx(1.0)
    n_bytes = batch.targets.numel()
    n_chars = int(((batch.targets & 0xC0) != 0x80).sum())
    assert n_chars < n_bytes  # the validation text has multi-byte characters
    assert metrics["eval_nats_per_char"] == pytest.approx(math.log(2) * n_bytes / n_chars)


def test_errors(tmp_path, source):
    with pytest.raises(ValueError, match="split must be one of"):
        BytesLMConfig(source=source, split="test")
    with pytest.raises(ValueError, match="vocab_size must be >= 256"):
        BytesLMConfig(source=source, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="train.txt"):
        next(BytesLMConfig(source=str(tmp_path / "nope")).batches(1))
    with pytest.raises(ValueError, match="cannot import"):
        load_source("leanseq.no_such_module:load", "train")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(BytesLMConfig(source=source, seq_len=10_000).batches(1))


def test_trainer_reports_bits_per_byte_on_the_validation_split(tmp_path, source):
    from leanseq.models.mamba import MambaConfig, MambaLM

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2))
    task = BytesLMConfig(source=source, seq_len=16)
    train = TrainSection(steps=3, batch_size=2, warmup_steps=0, eval_interval=0, eval_batches=2,
                         eval_batch_size=2, log_interval=1)
    trainer = Trainer(model, task, train, OutputSection(dir=str(tmp_path / "run"), progress=False, save_model=False))
    for inputs, _, _ in trainer.eval_set:
        for row in inputs:
            assert bytes(row.tolist()) in VALID
    summary = trainer.fit()
    assert summary["eval_bits_per_byte"] == pytest.approx(summary["eval_loss"] / math.log(2))
    assert 6.0 < summary["eval_bits_per_byte"] < 9.0  # barely trained: near log2(256) = 8
