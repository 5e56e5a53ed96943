"""LoRA through peft on every family: adapters change the model, step equals forward with adapters on, adapters
save and load on their own, merge exactly, and an adapter for another base is refused."""

import json
import random

import pytest
import torch

import leanseq
from leanseq.cli import main
from leanseq.ops import decode
from leanseq.ops.quant import quantize_int8
from leanseq.post.lora import (
    TARGETS,
    AdapterError,
    LoraSettings,
    add_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from leanseq.stream import Session

UNTIED_ALL = {family: TARGETS[t] for family, t in (("mamba", "mamba"), ("mamba2", "mamba2"), ("transformer", "llama"))}


def stepped(model, ids):
    state, out = model.init_state(ids.shape[0]), []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "transformer"])
def test_every_listed_target_trains_steps_saves_and_merges(make, family, tmp_path):
    base = make(family, tied=False)
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(ids)
    peft_model = add_lora(base, LoraSettings(r=4, targets=UNTIED_ALL[family]), init_lora_weights=False)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(UNTIED_ALL[family])  # every listed target got an adapter, nothing else
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())
    with torch.no_grad():
        adapted = peft_model(ids)
        assert float((adapted - plain).abs().max()) > 1e-2  # the adapters are in the computation
        torch.testing.assert_close(stepped(peft_model, ids), adapted, rtol=1e-4, atol=1e-4)
        session = Session(peft_model)  # the contract holds through peft's wrapper
        session.push(ids[0, :5])
        torch.testing.assert_close(session.push(ids[0, 5:])[-1], adapted[0, -1], rtol=1e-4, atol=1e-4)
    if family != "transformer":  # the native step reads plain layers only, so it steps aside for adapters
        assert "not an nn.Linear" in decode.plan_for(peft_model.get_base_model()).error
    save_adapter(peft_model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "leanseq_adapter.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    merged = merge_adapter(peft_model)
    assert type(merged) is type(base) and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = leanseq.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), adapted, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stepped(reloaded, ids), adapted, rtol=1e-4, atol=1e-4)
    if family != "transformer" and decode.library() is not None:
        assert decode.plan_for(reloaded).error is None  # merged: the native step runs again
    # the adapter alone, loaded onto a fresh copy of its base, gives the same logits
    again = load_adapter(make(family, tied=False), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_for_another_base_and_unsupported_targets_are_refused(make, tmp_path):
    peft_model = add_lora(make("mamba"), LoraSettings(r=2))
    save_adapter(peft_model, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="adapter for another base model .*hidden_size"):
        load_adapter(leanseq.load(leanseq.__path__[0] + "/data/induction-mamba"), tmp_path / "adapter")
    with pytest.raises(AdapterError, match="same shape but other weights"):
        load_adapter(make("mamba", seed=5), tmp_path / "adapter")
    load_adapter(make("mamba", seed=5), tmp_path / "adapter", allow_other_weights=True)  # asked for: applied
    with pytest.raises(AdapterError, match="conv1d.weight directly"):
        add_lora(make("mamba"), LoraSettings(targets=("conv1d",)))
    with pytest.raises(AdapterError, match="tied to its embeddings"):
        add_lora(make("mamba"), LoraSettings(targets=("in_proj", "embeddings")))
    with pytest.raises(AdapterError, match="quantised"):
        add_lora(quantize_int8(make("mamba")))
    with pytest.raises(AdapterError, match="not a LoRA adapter folder"):
        load_adapter(make("mamba"), tmp_path)
    with pytest.raises(leanseq.models.CheckpointError, match="holds a LoRA adapter .* not a model"):
        leanseq.load(tmp_path / "adapter")


def _words_text(folder):
    """A made-up language: 8 random consonant words in random order. Learnable, unlike anything Shakespeare."""
    rng = random.Random(0)
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(5)) for _ in range(8)]
    folder.mkdir()
    for split, n in (("train", 3000), ("validation", 600)):
        (folder / f"{split}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)))
    return folder


def test_finetune_teaches_the_trained_text_model_a_text_it_fails_on(tmp_path, capsys):
    text = _words_text(tmp_path / "text")
    base = leanseq.__path__[0] + "/data/shakespeare-mamba"
    rc = main(["finetune", base, "--text", str(text), "--task-set", "seq_len=24", "--steps", "30",
               "--batch-size", "8", "--lr", "2e-2", "--eval-batches", "2", "--out", str(tmp_path / "ft"),
               "--merge", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["before"]["eval_accuracy"] < 0.2, report["before"]  # fails before
    assert report["after"]["eval_accuracy"] > 0.6, report["after"]  # succeeds after
    assert report["trainable_parameters"] < 0.2 * report["parameters"]
    merged = leanseq.load(tmp_path / "ft" / "merged")
    assert (tmp_path / "ft" / "merged" / "tokenizer_config.json").is_file()  # the base's tokenizer travels along
    adapted = load_adapter(leanseq.load(base), tmp_path / "ft" / "adapter")
    ids = torch.tensor([list(b"the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-4, atol=1e-4)
