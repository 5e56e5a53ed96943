"""Original state-spaces checkpoints (pytorch_model.bin, read without unrestricted pickle) and Hub ids from the
local Hugging Face cache."""

import json
import os
import pickle

import pytest
import torch

import leanseq
from leanseq.models import CheckpointError
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM


def write_original(folder, model, config: dict):
    """What mamba_ssm's save_pretrained writes: its own config keys, torch.save of the state dict, the embedding
    named `backbone.embedding.weight` and the tied lm_head saved as well."""
    folder.mkdir(parents=True)
    tensors = dict(model.state_dict())
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    tensors["lm_head.weight"] = tensors["backbone.embedding.weight"]
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))


def test_a_state_spaces_mamba_loads_with_its_padded_vocabulary(tmp_path):
    torch.manual_seed(0)
    # vocab 37 padded to a multiple of 8 -> 40 embedding rows, as mamba_ssm does
    model = MambaLM(MambaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8))
    write_original(tmp_path / "orig", model, {
        "d_model": 32, "n_layer": 2, "vocab_size": 37, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True})
    loaded = leanseq.load(tmp_path / "orig")
    assert isinstance(loaded, MambaLM) and loaded.vocab_size == 40
    x = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(loaded(x), model(x))
    # and it saves as an HF checkpoint that loads again the same
    loaded.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(leanseq.load(tmp_path / "hf")(x), model(x))


def test_a_state_spaces_mamba2_loads(tmp_path):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                  n_groups=1, state_size=8, chunk_size=8, tie_word_embeddings=True))
    write_original(tmp_path / "orig", model, {
        "d_model": 32, "n_layer": 2, "vocab_size": 48, "pad_vocab_size_multiple": 16,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}})
    loaded = leanseq.load(tmp_path / "orig")
    x = torch.randint(0, 48, (1, 11))
    torch.testing.assert_close(loaded(x), model(x))


class Boom:
    def __reduce__(self):  # what a malicious pickle does: run a command on load
        return (os.system, ("touch pwned-by-pickle",))


def test_a_pickle_that_needs_more_than_tensors_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"backbone.embedding.weight": Boom()}, fh, protocol=2)
    (tmp_path / "evil" / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 1, "vocab_size": 8}))
    with pytest.raises(CheckpointError, match="needs more than tensors"):
        leanseq.load(tmp_path / "evil")
    assert not (tmp_path / "pwned-by-pickle").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
    ({"ssm_cfg": {"d_state": 8, "mystery": 1}}, "mystery"),
    ({"attn_layer_idx": [1]}, "attention"),
    ({"n_layer": 0}, "n_layer"),
])
def test_unsupported_original_configs_are_refused_naming_the_key(tmp_path, change, message):
    model = MambaLM(MambaConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, state_size=8))
    write_original(tmp_path / "o", model, {"d_model": 16, "n_layer": 1, "vocab_size": 8, **change})
    with pytest.raises(CheckpointError, match=message):
        leanseq.load(tmp_path / "o")


def fake_hub_cache(root, repo_id, files: dict):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_is_read_from_the_local_cache_offline(tmp_path, monkeypatch, variable):
    pytest.importorskip("huggingface_hub")
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, state_size=8))
    model.save_pretrained(tmp_path / "src")
    cache = tmp_path / "hf" / "hub"
    fake_hub_cache(cache, "someone/tiny-mamba", {n: tmp_path / "src" / n for n in ("config.json", "model.safetensors")})
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = leanseq.load("someone/tiny-mamba")
    x = torch.randint(0, 16, (1, 5))
    torch.testing.assert_close(loaded(x), model(x))


def test_a_hub_id_missing_from_the_cache_says_how_to_get_it(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as info:
        leanseq.load("state-spaces/mamba-130m-hf")
    text = str(info.value)
    assert "huggingface-cli download state-spaces/mamba-130m-hf" in text and "HF_HUB_OFFLINE=0" in text
    with pytest.raises(CheckpointError, match="does not exist"):
        leanseq.load(tmp_path / "no" / "such" / "folder")
