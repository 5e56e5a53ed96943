"""Mamba-2: logits equal transformers' Mamba2ForCausalLM; streaming equals a forward; checkpoints load."""

import json
import math

import pytest
import torch
import transformers

import leanseq
from leanseq.models import CheckpointError, ConfigError
from leanseq.models import mamba2 as mamba2_module
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM, Mamba2State

CONFIGS = [
    {"vocab_size": 97, "hidden_size": 16, "num_heads": 4, "head_dim": 8, "state_size": 8, "n_groups": 1,
     "num_hidden_layers": 2, "chunk_size": 8},
    # groups > 1, biases, wider conv, sequence not a multiple of the chunk
    {"vocab_size": 64, "hidden_size": 24, "expand": 2, "num_heads": 6, "head_dim": 8, "state_size": 4,
     "n_groups": 3, "num_hidden_layers": 2, "conv_kernel": 3, "use_bias": True, "chunk_size": 16},
    {"vocab_size": 50, "hidden_size": 12, "expand": 3, "num_heads": 4, "head_dim": 9, "state_size": 16,
     "n_groups": 2, "num_hidden_layers": 1, "use_conv_bias": False, "residual_in_fp32": False,
     "chunk_size": 5, "tie_word_embeddings": True},
]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_hf_model(seed, **cfg):
    torch.manual_seed(seed)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg)).eval()
    with torch.no_grad():  # move A, D, dt_bias, norms off their init values so a wrong formula cannot pass
        for name, p in hf.named_parameters():
            if "A_log" in name or name.endswith(".D") or "norm" in name or "dt_bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return hf


def tiny_model(idx=0, seed=0, **overrides):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(**{**CONFIGS[idx], **overrides})).eval()


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
def test_logits_match_transformers_both_directions(idx, tmp_path, monkeypatch):
    monkeypatch.setattr(mamba2_module, "SCAN_CHUNK_SIZE", None)  # configs' small chunks: several per sequence
    cfg = CONFIGS[idx]
    hf = random_hf_model(idx, **cfg)
    hf.save_pretrained(tmp_path / "hf")
    model = leanseq.load(tmp_path / "hf")
    assert isinstance(model, Mamba2LM) and not model.training
    x = torch.randint(0, cfg["vocab_size"], (2, 37))  # 37: not a multiple of any chunk_size above
    with torch.no_grad():
        expected = hf(x).logits
        assert rel_err(model(x), expected) <= 1e-4
        # leanseq -> transformers
        model.save_pretrained(tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert isinstance(back, transformers.Mamba2ForCausalLM)
        assert rel_err(back(x).logits, expected) <= 1e-4


def test_time_step_limit_matches_transformers_forward(tmp_path):
    cfg = {**CONFIGS[0], "time_step_limit": (0.01, 0.05)}
    hf = random_hf_model(3, **cfg)
    with torch.no_grad():  # spread dt so both ends of the clamp bind
        for block in hf.backbone.layers:
            block.mixer.dt_bias.copy_(torch.tensor([-6.0, -1.0, 0.5, 3.0]))
    hf.save_pretrained(tmp_path / "hf")
    model = leanseq.load(tmp_path / "hf")
    assert model.config.time_step_limit == (0.01, 0.05)
    x = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) <= 1e-4


def test_model_built_here_loads_in_transformers_with_same_logits(tmp_path):
    model = tiny_model(1, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name or name.endswith(".D") or "norm" in name or "dt_bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) <= 1e-4
    again = leanseq.load(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_tied_embeddings_share_one_parameter_and_are_not_saved_twice(tmp_path):
    model = tiny_model(2)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
    loaded = leanseq.load(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_step_by_step_equals_forward(impl, monkeypatch):
    monkeypatch.setattr(mamba2_module, "SCAN_IMPL", impl)
    model = tiny_model(1, seed=1)
    x = torch.randint(0, 64, (3, 23))
    with torch.no_grad():
        full = model(x)
        state = model.init_state(3)
        steps = []
        for t in range(x.shape[1]):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
    assert rel_err(torch.stack(steps, 1), full) <= 1e-5
    assert state.position.tolist() == [23, 23, 23]


def test_state_shapes_and_dtypes():
    model = tiny_model(1)
    cfg = model.config
    state = model.init_state(2)
    assert isinstance(state, Mamba2State)
    assert state.conv.shape == (2, 2, cfg.intermediate_size + 2 * 3 * 4, 2)
    assert state.ssm.shape == (2, 2, 6, 8, 4) and state.ssm.dtype == torch.float32
    assert state.position.dtype == torch.int64
    with torch.no_grad():
        assert model(torch.zeros(2, 3, dtype=torch.long), return_state=False).shape == (2, 3, 64)
        _, none_state = model._forward(torch.zeros(2, 3, dtype=torch.long), None)
    assert none_state is None


@pytest.mark.parametrize("piece", [1, 3, 7, 16, 29])
def test_prefill_in_pieces_equals_one_prefill(piece, monkeypatch):
    monkeypatch.setattr(mamba2_module, "SCAN_CHUNK_SIZE", 8)  # scan chunk boundaries fall inside the pieces
    model = tiny_model(1, seed=2)
    x = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        full, full_state = model(x, return_state=True)
        pieces, state = [], None
        for lo in range(0, 30, piece):
            logits, state = model(x[:, lo:lo + piece], state=state, return_state=True)
            pieces.append(logits)
    assert rel_err(torch.cat(pieces, 1), full) <= 1e-5
    torch.testing.assert_close(state.ssm, full_state.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.conv, full_state.conv)
    assert state.position.tolist() == [30, 30]


def test_greedy_generate_equals_argmax_of_full_forward():
    model = tiny_model(0, seed=8)
    prompt = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, temperature=0)
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_state_rows_select_and_concat():
    """A batched state split into rows continues each row exactly as that row alone would."""
    model = tiny_model(1, seed=9)
    x = torch.randint(0, 64, (2, 14))
    with torch.no_grad():
        _, state = model(x[:, :9], return_state=True)
        both = model(x[:, 9:], state=state)
        row1 = model(x[1:, 9:], state=state.select([1]))
        rejoined = type(state).concat([state.select([0]), state.select([1])])
        again = model(x[:, 9:], state=rejoined)
    assert rel_err(row1, both[1:]) <= 1e-5
    torch.testing.assert_close(again, both)


def test_time_step_limit_is_applied_in_forward_and_step():
    free = tiny_model(0, seed=3)
    limited = tiny_model(0, seed=3, time_step_limit=(0.0, 0.05))
    with torch.no_grad():  # large dt_bias so the clamp binds
        for m in (free, limited):
            for block in m.backbone.layers:
                block.mixer.dt_bias.fill_(2.0)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = limited(x)
        assert rel_err(full, free(x)) > 1e-3, "the clamp must change the output"
        state = limited.init_state(2)
        steps = []
        for t in range(12):
            logits, state = limited.step(x[:, t], state)
            steps.append(logits)
    assert rel_err(torch.stack(steps, 1), full) <= 1e-5


def test_chunked_and_reference_scan_give_same_model_gradients(monkeypatch):
    monkeypatch.setattr(mamba2_module, "SCAN_CHUNK_SIZE", 8)  # 21 tokens: three chunks, the last one padded
    model = tiny_model(1, seed=4).train()
    x = torch.randint(0, 64, (2, 21))
    grads = {}
    for impl in ("chunked", "reference"):
        monkeypatch.setattr(mamba2_module, "SCAN_IMPL", impl)
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["chunked"].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads["reference"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert grads["chunked"]["backbone.layers.0.mixer.A_log"].abs().sum() > 0


def test_tiny_model_trains():
    """From the default initialisation, a few Adam steps fit a fixed repeating sequence."""
    model = tiny_model(0, seed=6).train()
    x = torch.arange(24).remainder(7).repeat(4, 1)  # (4, 24) periodic tokens
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(97) - 0.5  # starts near uniform
    assert losses[-1] < 0.3 * losses[0]


def test_bfloat16_model_runs_forward_and_step():
    model = tiny_model(1, seed=7)
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(x)
        model.to(torch.bfloat16)
        low = model(x)
        state = model.init_state(2)
        assert state.conv.dtype == torch.bfloat16 and state.ssm.dtype == torch.float32
        step_logits, state = model.step(x[:, 0], state)
    assert low.dtype == torch.bfloat16 and rel_err(low.float(), ref) < 5e-2
    assert rel_err(step_logits.float(), ref[:, 0]) < 5e-2


def test_config_from_transformers_round_trips():
    hf_cfg = transformers.Mamba2Config(**CONFIGS[1]).to_dict()
    cfg = Mamba2Config.from_dict(hf_cfg)
    assert cfg.n_groups == 3 and cfg.time_step_limit == (0.0, math.inf) and cfg.time_step_rank == 2
    defaults = transformers.Mamba2Config()
    ours = Mamba2Config()
    for key in ("num_heads", "head_dim", "vocab_size", "hidden_size", "state_size", "num_hidden_layers",
                "layer_norm_epsilon", "expand", "conv_kernel", "n_groups", "use_bias", "use_conv_bias",
                "hidden_act", "residual_in_fp32", "time_step_rank", "time_step_min", "time_step_max",
                "chunk_size", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(defaults, key), key
    assert tuple(defaults.time_step_limit) == ours.time_step_limit


def test_config_written_by_older_transformers_loads():
    """transformers 4.4x configs carry rms_norm / norm_before_gate and write Infinity as a bare JSON token."""
    text = json.dumps({**CONFIGS[0], "model_type": "mamba2", "rms_norm": True, "norm_before_gate": True,
                       "time_step_limit": [0.0, math.inf], "transformers_version": "4.44.0"})
    cfg = Mamba2Config.from_dict(json.loads(text))
    assert cfg.time_step_limit == (0.0, math.inf) and cfg.num_heads == 4
    with pytest.raises(ConfigError, match="rms_norm"):
        Mamba2Config.from_dict({**CONFIGS[0], "rms_norm": False})


# ---- errors -----------------------------------------------------------------------------------------------


def test_inconsistent_config_is_rejected():
    with pytest.raises(ConfigError, match="hidden_size \\* expand"):
        Mamba2Config(hidden_size=16, expand=2, num_heads=4, head_dim=4)
    with pytest.raises(ConfigError, match="n_groups"):
        Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, n_groups=3)
    with pytest.raises(ConfigError, match="time_step_limit"):
        Mamba2Config(**CONFIGS[0], time_step_limit=(0.5, 0.1))


def test_unknown_config_key_is_named(tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_mystery_heads"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_mystery_heads"):
        leanseq.load(tmp_path / "m")


def _rewrite_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    path = str(folder / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "m")
    _rewrite_tensors(tmp_path / "m", lambda t: t.pop("backbone.layers.1.mixer.dt_bias"))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.dt_bias.*\(4,\)"):
        leanseq.load(tmp_path / "m")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "m")

    def shrink(t):
        key = "backbone.layers.0.mixer.conv1d.weight"
        t[key] = t[key][:, :, :3].clone()

    _rewrite_tensors(tmp_path / "m", shrink)
    expected = r"layers\.0\.mixer\.conv1d\.weight.*expected shape \(48, 1, 4\), found \(48, 1, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        leanseq.load(tmp_path / "m")


def test_corrupt_safetensors_file(tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        leanseq.load(tmp_path / "m")


def test_bad_input_ids_are_rejected():
    model = tiny_model(0)
    with pytest.raises(ValueError, match="token id 97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(3, dtype=torch.long))
    state = model.init_state(2)
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        model.step(torch.zeros(2, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="batch size 3"):
        model.step(torch.zeros(3, dtype=torch.long), state)
