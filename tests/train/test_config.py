from pathlib import Path

import pytest

import leanseq
from leanseq.train.config import load_config, parse_override

EXAMPLE = Path(leanseq.__file__).parent / "configs" / "induction_mamba.toml"


def test_example_config_loads_with_aliases_and_task_vocab():
    cfg = load_config(EXAMPLE)
    assert cfg.model["family"] == "mamba"
    assert cfg.model["hidden_size"] == 64 and cfg.model["num_hidden_layers"] == 2
    assert "d_model" not in cfg.model
    assert cfg.model["vocab_size"] == 16  # from the task
    assert cfg.task == {"name": "induction_heads", "seq_len": 256, "vocab_size": 16}
    assert cfg.train.batch_size == 8 and cfg.output.dir == "runs/induction_mamba"


def test_overrides_are_typed_and_applied_last():
    cfg = load_config(EXAMPLE, ["model.d_model=32", "train.steps=100", "train.lr=3e-4", "output.dir=/tmp/x",
                                "output.progress=false", "task.seq_len=64"])
    assert cfg.model["hidden_size"] == 32 and cfg.train.steps == 100 and cfg.train.lr == 3e-4
    assert cfg.output.dir == "/tmp/x" and cfg.output.progress is False and cfg.task["seq_len"] == 64
    assert parse_override("model.family=mamba2") == ("model", "family", "mamba2")
    assert parse_override('output.dir="a b"') == ("output", "dir", "a b")
    assert parse_override("train.lr=1") == ("train", "lr", 1)
    assert load_config(None, ["task.name=mqar", "model.family=mamba", "train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stesp=5", "train.stesp: unknown key; did you mean train.steps?"),
        ("output.dirr=x", "output.dirr: unknown key; did you mean output.dir?"),
        ("model.d_modle=8", "model.d_modle: unknown key; did you mean model.d_model?"),
        ("task.seq_length=8", "task.seq_length: unknown key; did you mean task.seq_len?"),
        ("trian.steps=5", "trian: unknown key; did you mean train?"),
        ("model.family=mamab", "did you mean 'mamba'"),
        ("task.name=induction", "unknown task 'induction'"),
        ("model.vocab_size=8", "model.vocab_size (8) is smaller than the task's vocabulary (16)"),
        ("train.min_lr=1.0", "train.min_lr (1.0) must not exceed train.lr"),
        ("train.steps", "expected section.key=value"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ValueError) as info:
        load_config(EXAMPLE, [override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=ten", "train.steps must be an integer, got 'ten'"),
        ("train.lr=true", "train.lr must be a number"),
        ("output.resume=1", "output.resume must be true or false"),
        ("model.hidden_size=wide", "hidden_size"),
        ("task.seq_len=2.5", "seq_len"),
    ],
)
def test_wrong_types_are_named(override, message):
    with pytest.raises((TypeError, ValueError)) as info:
        load_config(EXAMPLE, [override])
    assert message in str(info.value)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)
    no_family = tmp_path / "nofam.toml"
    no_family.write_text('[task]\nname = "mqar"\n')
    with pytest.raises(ValueError, match="model.family is required"):
        load_config(no_family)


def test_a_training_config_can_ask_for_the_lti_ablation():
    from leanseq.train.trainer import build_model

    model = build_model({"family": "mamba", "selective": False, "hidden_size": 16, "num_hidden_layers": 1,
                         "vocab_size": 16})
    assert model.config.selective is False
    assert not hasattr(model.backbone.layers[0].mixer, "x_proj")


@pytest.mark.parametrize("key", ["lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_optimizer_settings_are_refused_naming_the_key(key, value):
    from leanseq.models.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, [f"train.{key}={value}"])
    message = str(info.value)
    assert message.startswith(f"train.{key}: must be a finite") and message.endswith(f"got {float(value)}")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=0", "train.lr: must be a finite positive number, got 0.0"),
        ("train.lr=-1e-3", "train.lr: must be a finite positive number, got -0.001"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be a finite number >= 0, got -0.1"),
        ("train.grad_clip=-1", "train.grad_clip: must be a finite number >= 0 (0 disables clipping), got -1.0"),
        ("train.beta2=1", "train.beta2: must be a finite number in [0, 1), got 1.0"),
        ("train.warmup_steps=-1", "train.warmup_steps: must be an integer >= 0, got -1"),
        ("train.batch_size=0", "train.batch_size: must be an integer >= 1, got 0"),
        ("output.checkpoint_interval=-2", "output.checkpoint_interval: must be an integer >= 0, got -2"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_key(override, message):
    from leanseq.models.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, [override])
    assert str(info.value) == message
