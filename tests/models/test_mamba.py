"""Mamba-1: logits equal transformers' MambaForCausalLM; streaming equals one forward; checkpoints round-trip."""

import json

import pytest
import torch
import transformers

import leanseq
from leanseq.models import CheckpointError, ConfigError
from leanseq.models import mamba as mamba_module
from leanseq.models.mamba import MambaConfig, MambaLM

CONFIGS = [
    {"vocab_size": 97, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "time_step_rank": 5},
    {"vocab_size": 64, "hidden_size": 24, "state_size": 4, "num_hidden_layers": 3, "expand": 3, "conv_kernel": 3,
         "use_bias": True, "tie_word_embeddings": False},
    {"vocab_size": 50, "hidden_size": 16, "state_size": 16, "num_hidden_layers": 1, "use_conv_bias": False,
         "residual_in_fp32": False},
]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_hf_model(seed, **cfg):
    torch.manual_seed(seed)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg)).eval()
    with torch.no_grad():  # move A, D, norms off their init values so a wrong formula cannot pass
        for name, p in hf.named_parameters():
            if "A_log" in name or name.endswith(".D") or "norm" in name or "dt_proj.bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
def test_logits_match_transformers_both_directions(idx, tmp_path):
    cfg = CONFIGS[idx]
    hf = random_hf_model(idx, **cfg)
    hf.save_pretrained(tmp_path / "hf")
    model = leanseq.load(tmp_path / "hf")
    assert isinstance(model, MambaLM) and not model.training
    x = torch.randint(0, cfg["vocab_size"], (2, 41))
    with torch.no_grad():
        expected = hf(x).logits
        assert rel_err(model(x), expected) <= 1e-4
        # leanseq -> transformers
        model.save_pretrained(tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert rel_err(back(x).logits, expected) <= 1e-4


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_step_by_step_equals_forward(impl, monkeypatch):
    monkeypatch.setattr(mamba_module, "SCAN_IMPL", impl)
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(**CONFIGS[0])).eval()
    x = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(x)
        state = model.init_state(3)
        steps = []
        for t in range(x.shape[1]):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
    assert rel_err(torch.stack(steps, 1), full) <= 1e-5
    assert state.position.tolist() == [30, 30, 30]


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 29])
def test_prefill_in_chunks_equals_one_prefill(chunk, monkeypatch):
    monkeypatch.setattr(mamba_module, "SCAN_CHUNK_SIZE", 8)  # chunk boundaries of the scan fall inside pieces
    torch.manual_seed(1)
    model = MambaLM(MambaConfig(**CONFIGS[1])).eval()
    x = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        full, full_state = model(x, return_state=True)
        pieces, state = [], None
        for lo in range(0, 30, chunk):
            logits, state = model(x[:, lo:lo + chunk], state=state, return_state=True)
            pieces.append(logits)
    assert rel_err(torch.cat(pieces, 1), full) <= 1e-5
    torch.testing.assert_close(state.ssm, full_state.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.conv, full_state.conv)


def test_state_continuation_equals_longer_forward():
    torch.manual_seed(2)
    model = MambaLM(MambaConfig(**CONFIGS[0])).eval()
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        _, state = model(x[:, :12], return_state=True)
        cont = model(x[:, 12:], state=state)
        assert rel_err(cont, model(x)[:, 12:]) <= 1e-5


def test_training_gradients_flow_through_chunked_scan():
    torch.manual_seed(3)
    model = MambaLM(MambaConfig(**CONFIGS[0]))
    x = torch.randint(0, 97, (2, 19))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["backbone.layers.0.mixer.A_log"].abs().sum() > 0


def test_chunked_and_reference_scan_give_same_model_gradients(monkeypatch):
    torch.manual_seed(4)
    model = MambaLM(MambaConfig(**CONFIGS[0]))
    x = torch.randint(0, 97, (2, 21))
    grads = {}
    for impl in ("chunked", "reference"):
        monkeypatch.setattr(mamba_module, "SCAN_IMPL", impl)
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["chunked"].items():
        torch.testing.assert_close(g, grads["reference"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_bad_inputs_are_rejected_with_clear_errors():
    model = MambaLM(MambaConfig(**CONFIGS[0])).eval()
    with pytest.raises(ValueError, match="token id 97, outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        model.step(torch.zeros(1, 1, dtype=torch.long), model.init_state(1))
    with pytest.raises(ValueError, match="state holds 2 rows"):
        model(torch.zeros(1, 3, dtype=torch.long), state=model.init_state(2))
    with pytest.raises(TypeError, match="MambaState"):
        model.step(torch.zeros(1, dtype=torch.long), state={"ssm": None})


def test_checkpoint_errors_name_the_problem(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(**CONFIGS[0]))
    path = model.save_pretrained(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())

    bad = dict(cfg, hidden_sise=3)
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="unknown config key 'hidden_sise'"):
        leanseq.load(tmp_path / "typo")

    (tmp_path / "kind").mkdir()
    (tmp_path / "kind" / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt9")))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt9'"):
        leanseq.load(tmp_path / "kind")

    wrong = MambaLM(MambaConfig(**dict(CONFIGS[0], state_size=4)))
    wrong_path = wrong.save_pretrained(tmp_path / "wrong")
    (wrong_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"A_log'?: expected shape \(64, 8\), found \(64, 4\)"):
        leanseq.load(wrong_path)

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    del tensors["backbone.layers.1.mixer.D"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone.layers.1.mixer.D' \(expected shape \(64,\)\)"):
        leanseq.load(path)

    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        leanseq.load(path)

    with pytest.raises(CheckpointError, match="config.json"):
        leanseq.load(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    hf = random_hf_model(5, **CONFIGS[0])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = leanseq.load(tmp_path / "sharded")
    x = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) <= 1e-4


def test_save_is_atomic_and_overwrites(tmp_path):
    model = MambaLM(MambaConfig(**CONFIGS[2]))
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # overwriting an existing checkpoint leaves no temp folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_nan_weights_are_refused(tmp_path):
    model = MambaLM(MambaConfig(**CONFIGS[2]))
    with torch.no_grad():
        model.backbone.norm_f.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="NaN"):
        leanseq.load(tmp_path / "m")


def test_legacy_config_keys_of_older_hub_checkpoints(tmp_path):
    # the keys of state-spaces/mamba-130m-hf's config.json (written by transformers 4.39), shrunk
    legacy = {
        "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "d_inner": 64, "d_model": 32,
        "eos_token_id": 0, "expand": 2, "fused_add_norm": True, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.1, "intermediate_size": 64, "layer_norm_epsilon": 1e-05, "model_type": "mamba",
        "n_layer": 2, "num_hidden_layers": 2, "pad_token_id": 0, "pad_vocab_size_multiple": 8,
        "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "ssm_cfg": {},
        "state_size": 8, "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1,
        "time_step_min": 0.001, "time_step_rank": 2, "time_step_scale": 1.0, "torch_dtype": "float32",
        "transformers_version": "4.39.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
        "vocab_size": 50,
    }
    cfg = MambaConfig.from_dict(legacy)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32, 2, 64)
    with pytest.raises(ConfigError, match="'n_layer'=3 and 'num_hidden_layers'=2 disagree"):
        MambaConfig.from_dict(dict(legacy, n_layer=3))
    with pytest.raises(ConfigError, match="rms_norm"):
        MambaConfig.from_dict(dict(legacy, rms_norm=False))


def test_lti_ablation_is_time_invariant_and_round_trips(tmp_path):
    torch.manual_seed(6)
    cfg = MambaConfig(**dict(CONFIGS[0], selective=False))
    model = MambaLM(cfg).eval()
    assert not hasattr(model.backbone.layers[0].mixer, "x_proj")
    path = model.save_pretrained(tmp_path / "lti")
    assert json.loads((path / "config.json").read_text())["model_type"] == "leanseq_mamba_lti"
    loaded = leanseq.load(path)
    x = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        steps, state = [], model.init_state(2)
        for t in range(15):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
        assert rel_err(torch.stack(steps, 1), model(x)) <= 1e-5
    # dt, B and C do not depend on the input: the SSM inputs are identical for two different inputs
    mixer = model.backbone.layers[0].mixer
    d1 = mixer._ssm_inputs(torch.randn(1, 4, mixer.d_inner))
    d2 = mixer._ssm_inputs(torch.randn(1, 4, mixer.d_inner))
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b)
    selective = MambaLM(MambaConfig(**CONFIGS[0]))
    assert "selective" not in json.loads(selective.save_pretrained(tmp_path / "sel").joinpath("config.json").read_text())


def test_compiled_and_pytorch_scans_give_the_same_model_outputs():
    from leanseq.ops import native

    torch.manual_seed(7)
    model = MambaLM(MambaConfig(**CONFIGS[1])).eval()
    x = torch.randint(0, 64, (2, 50))
    outputs = {}
    try:
        for enabled in (True, False):
            native.set_enabled(enabled)
            with torch.no_grad():
                logits, state = model(x, return_state=True)
                step_logits, _ = model.step(x[:, 0], state)
            outputs[enabled] = (logits, state.ssm, step_logits)
    finally:
        native.set_enabled(None)
    for a, b in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cached_decay_rates_follow_weight_updates():
    torch.manual_seed(8)
    model = MambaLM(MambaConfig(**CONFIGS[0])).eval()
    x = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        before = model(x)
        model.backbone.layers[0].mixer.A_log.mul_(0.5)  # in place, as an optimizer step or load would do
        after = model(x)
        model.backbone.layers[0].mixer.A_log.mul_(2.0)
        restored = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(restored, before)
