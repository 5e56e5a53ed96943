"""The transformer baseline: Hugging Face Llama parity, KV-cache correctness, the absolute variant, bad input."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from leanseq import models
from leanseq.models.config import ConfigError
from leanseq.models.transformer import TransformerConfig, TransformerLM, TransformerState

transformers = pytest.importorskip("transformers")

VOCAB = 61


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tiny(**overrides) -> TransformerConfig:
    kw = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_model(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(tiny(**overrides)).eval()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights and biases too, so a misplaced or missing parameter shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0))


# hidden, heads, kv heads, head_dim, layers, tied, attention_bias, rope_theta
HF_CASES = [
    (32, 4, 2, None, 2, False, False, 10000.0),
    (32, 4, 1, None, 1, True, False, 500000.0),
    (24, 6, 3, 8, 2, True, True, 10000.0),
    (16, 2, 2, 12, 3, False, False, 1000.0),
]


def hf_config(hidden, heads, kv, head_dim, layers, tied, bias, theta):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        attention_bias=bias, rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=128, rms_norm_eps=1e-5,
    )


@pytest.mark.parametrize("case", HF_CASES, ids=[f"case{i}" for i in range(len(HF_CASES))])
def test_hf_llama_checkpoint_loads_with_identical_logits(case, tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(*case)).eval()
    randomize(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    ours = models.load(tmp_path / "hf")
    assert isinstance(ours, TransformerLM)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(ours(ids), expected) <= 1e-4
        # the cached path (chunked prefill, then a step) agrees with transformers too
        logits, state = ours(ids[:, :6], return_state=True)
        logits_rest, state = ours(ids[:, 6:10], state=state, return_state=True)
        last, _ = ours.step(ids[:, 10], state)
        cached = torch.cat([logits, logits_rest, last[:, None]], dim=1)
        assert rel_err(cached, expected) <= 1e-4


@pytest.mark.parametrize("case", HF_CASES[:3], ids=[f"case{i}" for i in range(3)])
def test_leanseq_checkpoint_loads_in_transformers_and_back(case, tmp_path):
    hidden, heads, kv, head_dim, layers, tied, bias, theta = case
    cfg = TransformerConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        attention_bias=bias, rope_parameters={"rope_theta": theta}, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    ours = TransformerLM(cfg).eval()
    randomize(ours, seed=2)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    assert "position_embedding" not in written  # a plain LlamaConfig
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (3, 9))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4
        again = models.load(tmp_path / "ours")
        assert torch.equal(again(ids), ours(ids))
    if tied:
        assert again.lm_head.weight is again.model.embed_tokens.weight


def test_gradients_match_transformers():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(*HF_CASES[0])).train()
    randomize(hf, seed=3)
    ours = TransformerLM(TransformerConfig.from_dict(hf.config.to_dict())).train()
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, VOCAB, (2, 8))
    ours(ids).logsumexp(-1).mean().backward()
    hf(ids).logits.logsumexp(-1).mean().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, hf_params[name].grad) <= 1e-4, name


# ---- the KV cache --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position_embedding", ["rope", "absolute"])
def test_step_by_step_equals_full_forward(position_embedding):
    model = tiny_model(position_embedding=position_embedding)
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(3, capacity=2)
        steps = []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert rel_err(torch.stack(steps, dim=1), full) <= 1e-5
    assert state.position.tolist() == [13, 13, 13]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16])
def test_chunked_prefill_equals_one_prefill(chunk):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 16))
    nxt = torch.randint(0, VOCAB, (2,))
    with torch.no_grad():
        whole, whole_state = model(ids, return_state=True)
        state = model.init_state(2, capacity=4)
        parts = []
        for start in range(0, ids.shape[1], chunk):
            logits, state = model(ids[:, start:start + chunk], state=state, return_state=True)
            parts.append(logits)
        assert rel_err(torch.cat(parts, dim=1), whole) <= 1e-5
        assert rel_err(model.step(nxt, state)[0], model.step(nxt, whole_state)[0]) <= 1e-5


def test_rows_at_different_positions_step_together():
    model = tiny_model(seed=4)
    a_ids, b_ids = torch.randint(0, VOCAB, (1, 3)), torch.randint(0, VOCAB, (1, 9))
    follow = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        _, a = model(a_ids, state=model.init_state(1, capacity=4), return_state=True)
        _, b = model(b_ids, state=model.init_state(1, capacity=16), return_state=True)
        assert a.capacity != b.capacity  # concat must pad to the larger one
        pool = TransformerState.concat([a.clone(), b.clone()])
        assert pool.position.tolist() == [3, 9] and pool.capacity == 16
        for t in range(follow.shape[1]):
            pooled, pool = model.step(follow[:, t], pool)
            alone_a, a = model.step(follow[:1, t], a)
            alone_b, b = model.step(follow[1:, t], b)
            assert rel_err(pooled, torch.cat([alone_a, alone_b])) <= 1e-5
        # a multi-token chunk with per-row positions, then split the pool back apart
        chunk = torch.randint(0, VOCAB, (2, 4))
        pooled, pool = model(chunk, state=pool, return_state=True)
        alone_a, a = model(chunk[:1], state=a, return_state=True)
        alone_b, b = model(chunk[1:], state=b, return_state=True)
        assert rel_err(pooled, torch.cat([alone_a, alone_b])) <= 1e-5
        again_b = model.step(follow[1:, 0], pool.select([1]))[0]
        assert rel_err(again_b, model.step(follow[1:, 0], b)[0]) <= 1e-5
        # and against the plain forward over each row's whole history
        history_a = torch.cat([a_ids, follow[:1], chunk[:1]], dim=1)
        assert rel_err(pooled[0], model(history_a)[0, -4:]) <= 1e-5


def test_chunked_cached_forward_has_the_gradients_of_the_plain_forward():
    model = tiny_model(seed=7).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids).logsumexp(-1).mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first, state = model(ids[:, :4], return_state=True)
    second, _ = model(ids[:, 4:], state=state, return_state=True)
    torch.cat([first, second], dim=1).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, reference[name]) <= 1e-4, name


def test_states_are_values_branching_from_an_old_state_is_safe():
    model = tiny_model(seed=6)
    prompt = torch.randint(0, VOCAB, (2, 5))
    t1, t2, t3 = (torch.randint(0, VOCAB, (2,)) for _ in range(3))
    with torch.no_grad():
        _, s0 = model(prompt, state=model.init_state(2, capacity=32), return_state=True)
        _, s1 = model.step(t1, s0)
        assert s1.k.data_ptr() == s0.k.data_ptr()  # appended in place, no copy
        # branch: s0 again with another token, also through a detached alias of s0
        l2, s2 = model.step(t2, s0)
        l2_alias, _ = model.step(t2, s0.detach())
        l3, _ = model.step(t3, s1)  # s1 must be unharmed by the branch
        reference = model(torch.cat([prompt, t1[:, None], t3[:, None]], dim=1))[:, -1]
        branch_reference = model(torch.cat([prompt, t2[:, None]], dim=1))[:, -1]
    assert rel_err(l3, reference) <= 1e-5
    assert rel_err(l2, branch_reference) <= 1e-5 and rel_err(l2_alias, branch_reference) <= 1e-5
    assert s2.k.data_ptr() != s1.k.data_ptr()


def test_cache_grows_geometrically():
    model = tiny_model()
    state = model.init_state(1, capacity=1)
    ptrs, capacities = [state.k.data_ptr()], [state.capacity]
    n = 100
    with torch.no_grad():
        for _ in range(n):
            _, state = model.step(torch.randint(0, VOCAB, (1,)), state)
            if state.k.data_ptr() != ptrs[-1]:
                ptrs.append(state.k.data_ptr())
                capacities.append(state.capacity)
    reallocations = len(ptrs) - 1
    assert reallocations <= math.ceil(math.log2(n)) + 1
    assert all(after == 2 * before for before, after in itertools.pairwise(capacities))
    assert state.capacity == 128 and int(state.position[0]) == n
    cfg = model.config
    cache_bytes = 2 * cfg.num_hidden_layers * 1 * cfg.num_key_value_heads * 128 * cfg.head_dim * 4
    assert state.nbytes() == cache_bytes + 1 * 8


def test_generate_greedy_matches_argmax_of_full_forward():
    model = tiny_model(seed=5)
    prompt = torch.randint(0, VOCAB, (2, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    with torch.no_grad():
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_bfloat16_cache_follows_model_dtype():
    model = tiny_model().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        full = model(ids).float()
        logits, state = model(ids, return_state=True)
    assert state.k.dtype == torch.bfloat16
    assert rel_err(logits.float(), full) <= 2e-2
    with pytest.raises(TypeError, match="dtype"):
        tiny_model().step(ids[:, 0], state)


# ---- the absolute-position variant ---------------------------------------------------------------------------
def test_absolute_variant_round_trip(tmp_path):
    model = tiny_model(position_embedding="absolute", max_position_embeddings=12)
    assert "model.embed_positions.weight" in model.state_dict()
    model.save_pretrained(tmp_path / "abs")
    written = json.loads((tmp_path / "abs" / "config.json").read_text())
    assert written["model_type"] == "leanseq_transformer" and written["position_embedding"] == "absolute"
    loaded = models.load(tmp_path / "abs")
    assert loaded.config == model.config and loaded.config.model_type == "leanseq_transformer"
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_absolute_variant_rejects_positions_past_its_table():
    model = tiny_model(position_embedding="absolute", max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.randint(0, VOCAB, (1, 9)))
    with torch.no_grad():
        _, state = model(torch.randint(0, VOCAB, (1, 8)), return_state=True)
    assert state.capacity == 8  # the cache never grows past the position table
    with pytest.raises(ValueError, match="position 8 is past max_position_embeddings=8"):
        model.step(torch.tensor([1]), state)
    grown = model(torch.randint(0, VOCAB, (1, 6)), state=model.init_state(1, capacity=4), return_state=True)[1]
    assert grown.capacity == 8
    _, grown = model.step(torch.tensor([1]), grown)
    assert grown.capacity == 8


# ---- config --------------------------------------------------------------------------------------------------
def test_config_round_trips_and_reads_transformers_configs():
    cfg = tiny(rope_parameters={"rope_theta": 5e5}, tie_word_embeddings=True)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    hf_dict = hf_config(*HF_CASES[2]).to_dict()
    from_hf = TransformerConfig.from_dict(hf_dict)
    assert (from_hf.head_dim, from_hf.num_key_value_heads, from_hf.attention_bias) == (8, 3, True)
    # an older config.json: rope_theta at the top level, rope_scaling null
    legacy = {k: v for k, v in hf_dict.items() if k != "rope_parameters"}
    legacy.update(rope_theta=250000.0, rope_scaling=None)
    assert TransformerConfig.from_dict(legacy).rope_theta == 250000.0
    assert TransformerConfig().head_dim == 128 and TransformerConfig().num_key_value_heads == 32
    # without a model_type the position_embedding key decides it
    absolute = TransformerConfig.from_dict({"position_embedding": "absolute", "hidden_size": 64})
    assert absolute.model_type == "leanseq_transformer" and absolute.to_dict()["model_type"] == "leanseq_transformer"


@pytest.mark.parametrize("bad, message", [
    ({"num_layers": 2}, "unknown config key 'num_layers'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"model_type": "mamba"}, "model_type 'mamba'"),
    ({"model_type": "llama", "position_embedding": "absolute"}, "means position_embedding='rope'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads 3"),
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_bad_config_is_rejected_by_name(bad, message):
    data = tiny().to_dict()
    data.update(bad)
    with pytest.raises(ConfigError, match=message):
        TransformerConfig.from_dict(data)


def test_bad_config_arguments_are_rejected():
    with pytest.raises(ConfigError, match="position_embedding must be 'rope' or 'absolute'"):
        tiny(position_embedding="alibi")
    with pytest.raises(ConfigError, match="hidden_size 30 is not a multiple of num_attention_heads 4"):
        tiny(hidden_size=30)
    with pytest.raises(ConfigError, match="head_dim"):
        tiny(head_dim=7)


# ---- bad input -----------------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=f"token id {VOCAB}, outside the vocabulary"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        model(torch.tensor([1, 2]))
    state = model.init_state(2)
    with pytest.raises(ValueError, match="state holds 2 rows"):
        model.step(torch.tensor([1, 2, 3]), state)
    other = tiny_model(num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"state tensor .k. has shape .*n_kv_heads"):
        other.step(torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match="different models"):
        TransformerState.concat([state, other.init_state(1)])
