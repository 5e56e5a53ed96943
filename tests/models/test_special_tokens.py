"""Special-token ids and generation_config.json survive load and save, and transformers reads them back."""

import json

import pytest
import torch

import leanseq
from leanseq.models import ConfigError
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.models.transformer import TransformerConfig, TransformerLM

SMALL = {
    "mamba": lambda **ids: MambaLM(MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, **ids)),
    "mamba2": lambda **ids: Mamba2LM(Mamba2Config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_heads=4,
                                                  head_dim=8, n_groups=1, state_size=8, chunk_size=8, **ids)),
    "llama": lambda **ids: TransformerLM(TransformerConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=2, num_attention_heads=2, **ids)),
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_special_token_ids_round_trip_through_leanseq_and_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = SMALL[family](bos_token_id=3, eos_token_id=7, pad_token_id=5)
    model.generation_config = {"eos_token_id": [7, 9], "max_new_tokens": 12}
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (3, 7, 5)

    again = leanseq.load(tmp_path / "ckpt")
    assert (again.config.bos_token_id, again.config.eos_token_id, again.config.pad_token_id) == (3, 7, 5)
    assert again.generation_config == {"eos_token_id": [7, 9], "max_new_tokens": 12}
    assert again.eos_token_ids() == [7, 9]  # generation_config.json wins over config.json, as in transformers

    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (3, 7, 5)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "ckpt")
    assert generation.eos_token_id == [7, 9] and generation.max_new_tokens == 12

    # and the other way: a folder transformers saved keeps its ids through leanseq
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    hf_model.save_pretrained(tmp_path / "hf")
    from_hf = leanseq.load(tmp_path / "hf")
    assert (from_hf.config.bos_token_id, from_hf.config.eos_token_id, from_hf.config.pad_token_id) == (3, 7, 5)
    assert from_hf.eos_token_ids() == [7, 9]


def test_unstated_ids_stay_out_of_config_json(tmp_path):
    MambaLM(MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1)).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(saved)
    assert not (tmp_path / "m" / "generation_config.json").exists()
    assert leanseq.load(tmp_path / "m").eos_token_ids() == []


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, []])
def test_bad_special_token_ids_are_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="eos_token_id"):
        MambaConfig.from_dict({"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1, "eos_token_id": bad})


def test_generation_stops_at_the_models_eos_by_default():
    torch.manual_seed(0)
    model = SMALL["mamba"]()
    prompt = torch.tensor([[1, 2, 3]])
    free = model.generate(prompt, 8)
    eos = int(free[0, 5])  # the third generated token
    stopping = SMALL["mamba"](eos_token_id=eos)
    stopping.load_state_dict(model.state_dict())
    out = stopping.generate(prompt, 8)
    first = next(i for i in range(3, free.shape[1]) if int(free[0, i]) == eos)
    assert torch.equal(out, free[:, : first + 1])  # stops right after the first eos
    assert torch.equal(stopping.generate(prompt, 8, ignore_eos=True), free)


def test_a_list_prompt_works_and_ragged_lists_get_a_clear_error():
    torch.manual_seed(0)
    model = SMALL["mamba"]()
    assert torch.equal(model.generate([[1, 2], [3, 4]], 3), model.generate(torch.tensor([[1, 2], [3, 4]]), 3))
    assert torch.equal(model.generate([1, 2], 3), model.generate(torch.tensor([[1, 2]]), 3))
    with pytest.raises(ValueError, match="different lengths"):
        model.generate([[1, 2], [3]], 3)


def test_repetition_penalty_follows_transformers():
    transformers = pytest.importorskip("transformers")
    from leanseq.models.generation import apply_repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -1.0, 4.0]])
    ids = torch.tensor([[0, 1], [3, 3]])
    seen = torch.zeros(2, 4, dtype=torch.bool).scatter_(1, ids, True)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)
