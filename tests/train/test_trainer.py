import dataclasses
import itertools
import json
import math
import random
from typing import ClassVar

import pytest
import torch
from torch import nn

import leanseq
from leanseq.models.base import LanguageModel
from leanseq.models.config import ConfigBase
from leanseq.models.state import State
from leanseq.tasks import get_task
from leanseq.train import OutputSection, Trainer, TrainSection, build_model, load_config, lr_schedule, run
from leanseq.train.checkpoint import TrainCheckpointError
from leanseq.train.trainer import param_groups


@dataclasses.dataclass
class TinyGRUConfig(ConfigBase):
    model_type: ClassVar[str] = "tiny_gru_for_tests"
    vocab_size: int = 16
    hidden_size: int = 16
    dropout: float = 0.2


@dataclasses.dataclass
class GRUState(State):
    hidden: torch.Tensor  # (1, B, H): layer first, batch second, like every leanseq state


class TinyGRULM(LanguageModel):
    """Embedding + GRU + head with dropout, so a resume is exact only if the torch RNG state is restored."""

    config_class = TinyGRUConfig
    state_class = GRUState

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.gru = nn.GRU(config.hidden_size, config.hidden_size, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch_size, device=None):
        return GRUState(position=torch.zeros(batch_size, dtype=torch.long, device=device),
                        hidden=torch.zeros(1, batch_size, self.config.hidden_size, device=device))

    def _forward(self, input_ids, state):
        hidden, last = self.gru(self.embed(input_ids), None if state is None else state.hidden)
        logits = self.lm_head(self.drop(hidden))
        if state is None:
            return logits, None
        return logits, GRUState(position=state.position + input_ids.shape[1], hidden=last)


TINY_MAMBA = {"family": "mamba", "vocab_size": 16, "hidden_size": 16, "num_hidden_layers": 1, "state_size": 4, "expand": 2}


def _sections(tmp_path, **train):
    settings = {"steps": 6, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2,
                    "eval_batch_size": 4, "log_interval": 1, "seed": 0}
    settings.update(train)
    return TrainSection(**settings), OutputSection(dir=str(tmp_path), progress=False, save_model=False)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    train = TrainSection(steps=12, lr=1.0, min_lr=0.1, warmup_steps=3)
    f = lr_schedule(train)
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == pytest.approx(1.0)
    assert f(11) == pytest.approx(0.1)
    decay = [f(s) for s in range(3, 12)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    midpoint = 3 + (11 - 3) / 2
    assert f(int(midpoint)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_skips_norms_biases_and_ssm_parameters():
    model = build_model(TINY_MAMBA)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("A_log") for n in no_decay_names) and any(n.endswith(".D") for n in no_decay_names)
    assert any("norm" in n for n in no_decay_names)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _gru_trainer(tmp_path, seed_model=0, family="gru", **train):
    torch.manual_seed(seed_model)
    task = get_task("induction_heads", seq_len=12)
    model = TinyGRULM(TinyGRUConfig()) if family == "gru" else build_model(TINY_MAMBA)
    return Trainer(model, task, *_sections(tmp_path, **train))


@pytest.mark.parametrize("family", ["gru", "mamba"])
def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, family):
    random.seed(0)
    torch.manual_seed(0)
    full = _gru_trainer(tmp_path / "full", family=family)
    full.fit()
    assert len(full.losses) == 6

    part = _gru_trainer(tmp_path / "part", family=family)
    for _ in range(3):
        part.train_step()
    path = part.save_checkpoint(tmp_path / "part" / "mid.pt")

    torch.manual_seed(1234)  # scramble every RNG a resume must restore
    random.seed(1234)
    resumed = _gru_trainer(tmp_path / "part", seed_model=99, family=family)
    assert resumed.load_checkpoint(path) == 3
    resumed.fit()
    assert resumed.losses == full.losses[3:]  # exactly equal, not approximately
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.scheduler.get_last_lr() == full.scheduler.get_last_lr()


def test_resume_without_restoring_rng_would_differ(tmp_path):
    # the test above can fail: dropout draws from the torch RNG, so a fresh RNG gives different losses
    full = _gru_trainer(tmp_path / "a")
    full.fit()
    part = _gru_trainer(tmp_path / "b")
    for _ in range(3):
        part.train_step()
    torch.manual_seed(1234)
    part.fit()
    assert part.losses[3:] != full.losses[3:]


def test_checkpoint_of_another_model_or_task_is_refused(tmp_path):
    trainer = _gru_trainer(tmp_path)
    trainer.train_step()
    path = trainer.save_checkpoint()
    torch.manual_seed(0)
    other_task = Trainer(TinyGRULM(TinyGRUConfig()), get_task("induction_heads", seq_len=13), *_sections(tmp_path))
    with pytest.raises(TrainCheckpointError, match="different task"):
        other_task.load_checkpoint(path)
    other_model = Trainer(TinyGRULM(TinyGRUConfig(hidden_size=8)), get_task("induction_heads", seq_len=12),
                          *_sections(tmp_path))
    with pytest.raises(TrainCheckpointError, match="different model"):
        other_model.load_checkpoint(path)


def test_metrics_evaluation_and_gradient_clipping(tmp_path):
    trainer = _gru_trainer(tmp_path, grad_clip=0.01)
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == r["step"] * 4 * 12 for r in train)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert [r["loss"] for r in train] == trainer.losses
    assert train[0]["lr"] == pytest.approx(1e-2 / 3)  # first warm-up step
    assert summary["step"] == 6 and summary["eval_accuracy"] == evals[-1]["eval_accuracy"]
    # clipping: the recorded norm is before clipping, so a 0.01 cap is far below it
    assert all(r["grad_norm"] > 0.01 for r in train)


def test_eval_accuracy_matches_the_accuracy_helper(tmp_path):
    from leanseq.tasks import accuracy

    trainer = _gru_trainer(tmp_path, eval_batches=1)
    trainer.model.eval()
    inputs, targets, mask = trainer.eval_set[0]
    with torch.no_grad():
        expected = accuracy(trainer.model(inputs), targets, mask)
    assert trainer.evaluate()["eval_accuracy"] == expected


def test_nan_loss_stops_the_run(tmp_path):
    trainer = _gru_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.lm_head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        trainer.train_step()


def test_run_from_config_trains_mamba_resumes_and_saves_a_loadable_model(tmp_path):
    overrides = [
        "model.family=mamba", "model.d_model=16", "model.n_layers=1", "model.state_size=4",
        "task.name=induction_heads", "task.seq_len=16", "train.steps=4", "train.batch_size=4",
        "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=1", "train.eval_batch_size=4",
        f"output.dir={json.dumps(str(tmp_path))}", "output.progress=false", "output.checkpoint_interval=2",
    ]
    summary = run(load_config(None, overrides))
    assert summary["step"] == 4 and summary["tokens_per_s"] > 0 and 0 <= summary["eval_accuracy"] <= 1
    model = leanseq.models.load(tmp_path / "model")
    assert model.config.hidden_size == 16
    losses_first = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["kind"] == "train"]

    # a second invocation with more steps resumes from step 4 instead of starting over
    summary = run(load_config(None, overrides[:-2] + ["train.steps=5", "output.progress=false"] + overrides[-1:]))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5] and summary["step"] == 5
    assert [r["loss"] for r in records if r["kind"] == "train"][:4] == losses_first
    assert json.loads((tmp_path / "run_config.json").read_text())["train"]["steps"] == 5


def test_gradients_are_clipped_to_grad_clip_before_the_optimizer_step(tmp_path):
    trainer = _gru_trainer(tmp_path, grad_clip=0.05)
    seen = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer.optimizer.register_step_pre_hook(record_norm)
    record = trainer.train_step()
    assert record["grad_norm"] > 0.05  # the unclipped norm is reported
    assert seen[0] == pytest.approx(0.05, rel=1e-4)  # the optimizer saw the clipped gradients


# ---- resuming from a damaged or different run ----------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    _gru_trainer(tmp_path, steps=3).fit()
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"kind": "train", "step": 4, "lo')  # a run killed in the middle of writing step 4
    resumed = _gru_trainer(tmp_path, steps=4)
    with pytest.warns(UserWarning, match=rf"{metrics}: dropping its last line 5, cut off"):
        assert resumed.load_checkpoint() == 3
    resumed.fit()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad_line", ["garbage", "[1, 2]", '{"step": "three"}'])
def test_a_corrupt_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, bad_line):
    _gru_trainer(tmp_path, steps=3).fit()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = bad_line
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainCheckpointError, match=rf"{metrics}: line 2 is not a metrics record"):
        _gru_trainer(tmp_path, steps=3).load_checkpoint()
    assert metrics.read_text().splitlines()[1] == bad_line  # left as it was


@pytest.mark.parametrize(
    "key,new",
    [("seed", 1), ("batch_size", 8), ("lr", 5e-3), ("min_lr", 1e-4), ("warmup_steps", 1), ("weight_decay", 0.5),
     ("grad_clip", 0.5), ("beta2", 0.9)],
)
def test_resuming_with_a_setting_that_shapes_the_training_is_refused_unless_allowed(tmp_path, key, new):
    _gru_trainer(tmp_path, steps=2).fit()
    old = getattr(_sections(tmp_path)[0], key)
    with pytest.raises(TrainCheckpointError) as info:
        _gru_trainer(tmp_path, steps=4, **{key: new}).load_checkpoint()
    message = str(info.value)
    assert f"different training setup: train.{key}: {old!r} -> {new!r}" in message
    assert "output.allow_config_change=true" in message

    torch.manual_seed(0)
    train, output = _sections(tmp_path, steps=4, **{key: new})
    forced = Trainer(TinyGRULM(TinyGRUConfig()), get_task("induction_heads", seq_len=12), train,
                     dataclasses.replace(output, allow_config_change=True))
    with pytest.warns(UserWarning, match=rf"train\.{key}: {old!r} -> {new!r}"):
        assert forced.load_checkpoint() == 2
    assert forced.fit()["step"] == 4


def test_resuming_with_more_steps_or_other_eval_and_log_settings_warns(tmp_path):
    _gru_trainer(tmp_path, steps=2).fit()
    resumed = _gru_trainer(tmp_path, steps=4, eval_interval=2, log_interval=2)
    with pytest.warns(UserWarning, match=r"train.eval_interval: 3 -> 2; train.log_interval: 1 -> 2; "
                                          r"train.steps: 2 -> 4"):
        assert resumed.load_checkpoint() == 2


def test_an_older_checkpoint_without_train_settings_is_compared_with_run_config_json(tmp_path):
    from leanseq.train.checkpoint import load_train_state, save_train_state

    overrides = [
        "model.family=mamba", "model.d_model=8", "model.n_layers=1", "model.state_size=4",
        "task.name=induction_heads", "task.seq_len=8", "train.steps=2", "train.batch_size=2",
        "train.eval_batches=1", "train.eval_batch_size=2", f"output.dir={json.dumps(str(tmp_path))}",
        "output.progress=false", "output.save_model=false",
    ]
    run(load_config(None, overrides))
    state = load_train_state(tmp_path / "checkpoint.pt")
    del state["identity"]["train"]  # as written before the training settings were recorded
    save_train_state(tmp_path / "checkpoint.pt", state)
    with pytest.raises(TrainCheckpointError, match=r"train.seed: 0 -> 7"):
        run(load_config(None, [*overrides, "train.steps=3", "train.seed=7"]))


def test_a_model_change_is_named_key_by_key(tmp_path):
    _gru_trainer(tmp_path, steps=2).fit()
    torch.manual_seed(0)
    other = Trainer(TinyGRULM(TinyGRUConfig(dropout=0.5)), get_task("induction_heads", seq_len=12),
                    *_sections(tmp_path, steps=2))
    with pytest.raises(TrainCheckpointError, match=r"different model: model.dropout: 0.2 -> 0.5 \(checkpoint"):
        other.load_checkpoint()
