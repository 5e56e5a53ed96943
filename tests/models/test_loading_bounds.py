"""Bounded loading: a checkpoint's config is checked against its safetensors headers before anything is
allocated, index.json cannot name files outside the folder, and bad numbers in config.json name their key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanseq
from leanseq.models import CheckpointError, ConfigError
from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.models.transformer import TransformerConfig, TransformerLM

FAMILIES = {
    "mamba": lambda **kw: MambaLM(MambaConfig(**{
        "vocab_size": 97, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "time_step_rank": 5, **kw})),
    "mamba_untied": lambda **kw: MambaLM(MambaConfig(**{
        "vocab_size": 97, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "tie_word_embeddings": False,
        **kw})),
    "mamba_lti": lambda **kw: MambaLM(MambaConfig(**{
        "vocab_size": 97, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "selective": False, **kw})),
    "mamba2": lambda **kw: Mamba2LM(Mamba2Config(**{
        "vocab_size": 97, "hidden_size": 16, "num_heads": 4, "head_dim": 8, "state_size": 8, "n_groups": 1,
        "num_hidden_layers": 2, "chunk_size": 8, **kw})),
    "mamba2_tied": lambda **kw: Mamba2LM(Mamba2Config(**{
        "vocab_size": 97, "hidden_size": 16, "num_heads": 4, "head_dim": 8, "state_size": 8, "n_groups": 2,
        "num_hidden_layers": 2, "chunk_size": 8, "tie_word_embeddings": True, **kw})),
    "llama": lambda **kw: TransformerLM(TransformerConfig(**{
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, **kw})),
    "llama_tied_absolute": lambda **kw: TransformerLM(TransformerConfig(**{
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "tie_word_embeddings": True, "position_embedding": "absolute",
        "max_position_embeddings": 64, **kw})),
}


def saved(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = FAMILIES[family](**overrides)
    with torch.no_grad():  # norms and A/D off their init values, so a tensor left uninitialised shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.save_pretrained(folder)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---- the load runs in a fresh process, so its time and peak memory are its own ----------------------------
# The process first loads a sound checkpoint (as a server that already serves one would have), so one-time
# costs that do not depend on the config (imports, torch's first use of the meta device) are not measured.
PROBE = r"""
import json, sys, time
import leanseq

def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)

if sys.argv[2]:
    leanseq.load(sys.argv[2])
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
except OSError:
    pass
before = status_kib("VmHWM")
start = time.perf_counter()
try:
    leanseq.load(sys.argv[1])
    error = None
except Exception as exc:
    error = [type(exc).__name__, str(exc)]
print(json.dumps({"error": error, "seconds": time.perf_counter() - start,
                  "peak_growth_mib": (status_kib("VmHWM") - before) / 1024}))
"""


def load_in_subprocess(path: Path, warm_up: Path | None = None, timeout: float = 60.0) -> dict:
    """Load `path` in a fresh Python (after loading `warm_up`): its error, seconds and peak memory growth."""
    repo_root = Path(leanseq.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(warm_up or "")], check=False,
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} did not finish within {timeout} s")
    assert out.returncode == 0, f"the loading process died (rc {out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the peak resident size")
@pytest.mark.parametrize("family", ["mamba", "mamba2", "llama"])
def test_huge_vocab_in_config_fails_fast_without_allocating(family, tmp_path):
    sound = saved(family, tmp_path / "sound")
    path = saved(family, tmp_path / "m")
    edit_config(path, vocab_size=20_000_000)  # 2.5 GB per (vocab, hidden) matrix if it were built
    result = load_in_subprocess(path, warm_up=sound)
    assert result["error"] is not None, "a checkpoint whose config disagrees with its tensors loaded"
    kind, message = result["error"]
    assert kind == "CheckpointError", message
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    embedding = "backbone.embeddings.weight" if family.startswith("mamba") else "model.embed_tokens.weight"
    assert f"tensor '{embedding}': expected shape (20000000, {hidden}), found (97, {hidden})" in message
    assert result["seconds"] < 1.0, result
    assert result["peak_growth_mib"] < 100, result


@pytest.mark.parametrize("family", ["mamba", "llama"])
def test_huge_layer_count_is_bounded_by_the_checkpoint(family, tmp_path):
    sound = saved(family, tmp_path / "sound")
    path = saved(family, tmp_path / "m")
    edit_config(path, num_hidden_layers=10**9)
    result = load_in_subprocess(path, warm_up=sound, timeout=30)
    assert result["error"] is not None and result["error"][0] == "CheckpointError", result
    assert "num_hidden_layers" in result["error"][1] and "1000000000" in result["error"][1]
    assert result["seconds"] < 1.0, result


@pytest.mark.parametrize("vocab_size", [2**62, 2**70])
def test_size_beyond_int64_is_a_clear_error(vocab_size, tmp_path):
    path = saved("mamba", tmp_path / "m")
    edit_config(path, vocab_size=vocab_size)
    with pytest.raises(CheckpointError, match="config.json"):
        leanseq.load(path)


def test_config_that_is_not_a_regular_file_is_refused(tmp_path):
    path = saved("mamba", tmp_path / "m")
    (path / "config.json").unlink()
    os.mkfifo(path / "config.json")  # reading it would block forever
    result = load_in_subprocess(path, timeout=20)
    assert result["error"] is not None and result["error"][0] == "CheckpointError", result
    assert "config.json" in result["error"][1] and "regular file" in result["error"][1]


def test_shard_that_is_not_a_regular_file_is_refused(tmp_path):
    path = saved("mamba", tmp_path / "m")
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")
    result = load_in_subprocess(path, timeout=20)
    assert result["error"] is not None and result["error"][0] == "CheckpointError", result
    assert "model.safetensors" in result["error"][1] and "regular file" in result["error"][1]


# ---- index.json ---------------------------------------------------------------------------------------------
def shard_with_index(path: Path, shard_name: str, shard: Path | None = None) -> None:
    """Write an index into `path` that maps every tensor of `shard` (default: its model.safetensors) to
    `shard_name`."""
    from safetensors import safe_open

    with safe_open(str(shard or path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: shard_name for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_entry_with_dotdot_is_refused(tmp_path):
    path = saved("mamba", tmp_path / "m")
    shutil.move(path / "model.safetensors", tmp_path / "x.safetensors")
    shard_with_index(path, "../x.safetensors", shard=tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"'\.\./x\.safetensors'.*plain file name"):
        leanseq.load(path)


def _index_via(path: Path, tmp_path: Path, name_for) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(path / "model.safetensors", outside / "x.safetensors")
    shard_with_index(path, name_for(outside / "x.safetensors"))
    (path / "model.safetensors").unlink()


def test_index_entry_with_absolute_path_is_refused(tmp_path):
    path = saved("mamba", tmp_path / "m")
    _index_via(path, tmp_path, str)
    with pytest.raises(CheckpointError, match="elsewhere/x.safetensors'.*plain file name"):
        leanseq.load(path)


def test_index_entry_in_a_subfolder_is_refused(tmp_path):
    path = saved("mamba", tmp_path / "m")
    (path / "sub").mkdir()
    shutil.move(path / "model.safetensors", path / "sub" / "x.safetensors")
    shard_with_index(path, "sub/x.safetensors", shard=path / "sub" / "x.safetensors")
    with pytest.raises(CheckpointError, match="'sub/x.safetensors'.*plain file name"):
        leanseq.load(path)


def test_index_entry_symlinked_out_of_the_folder_is_refused(tmp_path):
    path = saved("mamba", tmp_path / "m")
    _index_via(path, tmp_path, lambda _: "model-00001-of-00001.safetensors")
    (path / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "elsewhere" / "x.safetensors")
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors.*outside"):
        leanseq.load(path)


def test_hub_cache_layout_with_symlinks_beside_the_index_loads(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/* are symlinks to blobs/<hash>, index and shards alike. The
    shards lie beside the index they are resolved from, so this layout loads."""
    path = saved("mamba", tmp_path / "m")
    reference = leanseq.load(path)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    shard_with_index(path, "model-00001-of-00001.safetensors")
    for name, blob in [("config.json", "c0"), ("model.safetensors.index.json", "i0"),
                       ("model-00001-of-00001.safetensors", "s0")]:
        source = path / ("model.safetensors" if name.startswith("model-") else name)
        shutil.copy(source, blobs / blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    model = leanseq.load(snapshot)
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"backbone.norm_f.weight": 3}, None])
def test_malformed_index_is_refused(weight_map, tmp_path):
    path = saved("mamba", tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        leanseq.load(path)


# ---- numbers in config.json ---------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_NUMBERS = [
    ("mamba", "time_step_rank", 0), ("mamba", "time_step_rank", -3),
    ("mamba", "layer_norm_epsilon", NAN), ("mamba", "layer_norm_epsilon", -1e-5),
    ("mamba", "layer_norm_epsilon", 0.0), ("mamba", "layer_norm_epsilon", INF),
    ("mamba", "time_step_min", 0.0), ("mamba", "time_step_min", -0.01), ("mamba", "time_step_min", NAN),
    ("mamba", "time_step_max", 0.0005), ("mamba", "time_step_max", INF),
    ("mamba", "time_step_floor", -1e-4), ("mamba", "time_step_floor", NAN),
    ("mamba", "time_step_scale", NAN), ("mamba", "initializer_range", -0.1), ("mamba", "initializer_range", NAN),
    ("mamba2", "time_step_rank", 0), ("mamba2", "time_step_rank", -1),
    ("mamba2", "layer_norm_epsilon", NAN), ("mamba2", "layer_norm_epsilon", -1e-5),
    ("mamba2", "time_step_min", 0.0), ("mamba2", "time_step_max", NAN), ("mamba2", "time_step_max", 0.0001),
    ("mamba2", "time_step_floor", -1.0), ("mamba2", "initializer_range", NAN),
    ("llama", "rms_norm_eps", NAN), ("llama", "rms_norm_eps", -1e-6), ("llama", "rms_norm_eps", 0.0),
    ("llama", "rope_theta", NAN), ("llama", "rope_theta", INF),
]


@pytest.mark.parametrize(("family", "key", "value"), BAD_NUMBERS, ids=[f"{f}-{k}-{v}" for f, k, v in BAD_NUMBERS])
def test_invalid_number_in_config_names_the_key(family, key, value, tmp_path):
    path = saved(family, tmp_path / "m")
    if key == "rope_theta":  # saved configs carry it inside rope_parameters, which wins over a top-level key
        edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": value})
    else:
        edit_config(path, **{key: value})
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        leanseq.load(path)


# ---- what loads still loads, whole and unchanged -------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loaded_model_equals_the_saved_one(family, tmp_path):
    torch.manual_seed(1)
    original = FAMILIES[family]()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = original.save_pretrained(tmp_path / "m")
    model = leanseq.load(path)
    assert type(model) is type(original) and not model.training
    assert model.state_dict().keys() == original.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original.state_dict()[name]), name
    # aliases stay aliases: a tied lm_head is the embedding itself, not a copy
    def aliases(m):
        groups = {}
        for name, p in m.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        return sorted(g for g in groups.values() if len(g) > 1)

    assert aliases(model) == aliases(original)
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), original.eval()(x))
        state = model.init_state(2)
        logits, _ = model.step(x[:, 0], state)
        assert torch.equal(logits, original.step(x[:, 0], original.init_state(2))[0])
    # the loaded weights are the model's own memory: training them leaves the file alone
    before = (path / "model.safetensors").read_bytes()
    model.train()
    model(x).float().logsumexp(-1).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.01 * p.grad)
    assert (path / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("family", ["mamba", "llama_tied_absolute"])
def test_dtype_and_device_arguments_still_apply(family, tmp_path):
    torch.manual_seed(2)
    original = FAMILIES[family]().to(torch.bfloat16)
    path = original.save_pretrained(tmp_path / "m")
    assert {p.dtype for p in leanseq.load(path).parameters()} == {torch.bfloat16}
    model = leanseq.load(path, dtype=torch.float32, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.device == torch.device("cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original.state_dict()[name].float()), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_first_load_stays_cheap_no_meta_kernels_run(family, tmp_path):
    """Building on the meta device must not run torch's Python meta kernels (random init, log, ...): their first
    use imports torch._dynamo, which made every process's first leanseq.load of even a tiny model take seconds."""
    path = saved(family, tmp_path / family)
    probe = (
        "import sys, leanseq; m = leanseq.load(sys.argv[1]); m(__import__('torch').tensor([[1, 2]]));"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
