"""leanseq.text.trained: the cached trained model the post-training benchmark uses (tiny recipes here)."""

import dataclasses
import random

import pytest
import torch

from leanseq.text import trained
from leanseq.text.trained import TextModelRecipe, load_or_train


@pytest.fixture
def text_folder(tmp_path):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question"]
    for split, n in (("train", 3000), ("validation", 600)):
        (tmp_path / f"{split}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)))
    return tmp_path


def tiny(source, **changes) -> TextModelRecipe:
    return dataclasses.replace(TextModelRecipe(
        name="tiny", hidden_size=16, num_hidden_layers=1, state_size=4, source=str(source), seq_len=16, steps=4,
        batch_size=2, warmup_steps=1, eval_batches=1, eval_batch_size=2, checkpoint_interval=2), **changes)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trains_once_then_loads_the_same_weights_from_the_cache(text_folder, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    recipe = tiny(text_folder)
    cache = tmp_path / "cache"
    model, record = load_or_train(recipe, cache, progress=False)
    assert record["steps"] == 4 and record["tokens"] == 4 * 2 * 16 == recipe.tokens
    assert record["parameters"] == model.num_parameters() and record["resumed_at_step"] == 0
    assert record["eval_bits_per_byte"] > 0 and record["train_seconds"] > 0
    assert (cache / "tiny" / "run" / "metrics.jsonl").is_file()
    assert not (cache / "tiny" / "run" / "checkpoint.pt").exists()  # optimizer state dropped once complete
    first = weights(model)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr("leanseq.train.build_trainer", no_training)
    again, record_again = load_or_train(recipe, cache, progress=False)
    assert record_again == record and same(weights(again), first)
    # the cached folder is a checkpoint with its tokenizer: leanseq.text.load reads it
    from leanseq.text import load

    loaded, tokenizer = load(cache / "tiny" / "model")
    assert tokenizer.vocab_size <= loaded.vocab_size == 257


def test_seeded_training_is_reproducible_and_another_recipe_retrains(text_folder, tmp_path):
    torch.set_num_threads(1)
    a, _ = load_or_train(tiny(text_folder), tmp_path / "a", progress=False)
    b, _ = load_or_train(tiny(text_folder), tmp_path / "b", progress=False)
    assert same(weights(a), weights(b))
    # same folder, another seed: the stale model is replaced, not returned
    c, record = load_or_train(tiny(text_folder, seed=1), tmp_path / "a", progress=False)
    assert record["recipe"]["seed"] == 1 and not same(weights(a), weights(c))


def test_an_interrupted_training_resumes_from_its_checkpoint(text_folder, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    recipe = tiny(text_folder)
    full, _ = load_or_train(recipe, tmp_path / "full", progress=False)
    # stop the run during step 3, after its step-2 checkpoint (checkpoint_interval=2)
    from leanseq.train import Trainer

    original = Trainer.train_step

    def stop_at_three(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        load_or_train(recipe, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "tiny" / trained.RECORD_FILE).exists()  # incomplete: no record
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed, record = load_or_train(recipe, tmp_path / "cut", progress=False)
    assert record["resumed_at_step"] == 2 and record["steps"] == 4
    assert same(weights(resumed), weights(full))


def test_recipe_names_must_be_plain_folder_names():
    for bad in ("", "../up", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="plain folder name"):
            TextModelRecipe(name=bad)
