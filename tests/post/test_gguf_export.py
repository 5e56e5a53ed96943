"""GGUF export: llama.cpp's names and metadata, llama.cpp's logits equal leanseq's, and the file equals what
llama.cpp's own converter writes for the same weights. The llama.cpp checks need the build that
`python benchmarks/vs_llamacpp.py --build` caches; without it they skip and say so."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import leanseq
from leanseq.models.commands import bundled_checkpoint

gguf = pytest.importorskip("gguf")

from leanseq.post.exportable import UnsupportedExportError
from leanseq.post.gguf_export import export_gguf

_VS = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_llamacpp.py"
_spec = importlib.util.spec_from_file_location("vs_llamacpp", _VS)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)  # its llama.cpp discovery helpers: cache_dir, binaries, is_built, llama_src
CACHE = vs.cache_dir()
NO_LLAMACPP = f"llama.cpp is not built in {CACHE} (run: python benchmarks/vs_llamacpp.py --build)"
needs_llamacpp = pytest.mark.skipif(not vs.is_built(CACHE), reason=NO_LLAMACPP)
PROMPT = [3, 17, 42, 5, 9, 11]
NEW = 4


def tiny_mamba2():
    from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(vocab_size=100, hidden_size=64, num_heads=8, head_dim=16, state_size=16,
                                 n_groups=2, num_hidden_layers=2)).eval()


MODELS = {"mamba": lambda: leanseq.load(bundled_checkpoint("shakespeare-mamba")), "mamba2": tiny_mamba2}


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def test_gguf_names_metadata_and_transforms_follow_llamacpps_converter(tmp_path):
    model = MODELS["mamba2"]()
    path = tmp_path / "m2.gguf"
    info = export_gguf(model, path)
    assert info["gguf_vocab_size"] == 112  # 100 padded to a multiple of 16
    meta = fields(path)
    assert meta["general.architecture"] == "mamba2" and meta["tokenizer.ggml.model"] == "none"
    assert {k: meta[f"mamba2.{k}"] for k in ("embedding_length", "block_count", "ssm.conv_kernel", "ssm.inner_size",
                                              "ssm.state_size", "ssm.time_step_rank", "ssm.group_count",
                                              "feed_forward_length", "attention.head_count", "vocab_size")} == {
        "embedding_length": 64, "block_count": 2, "ssm.conv_kernel": 4, "ssm.inner_size": 128,
        "ssm.state_size": 16, "ssm.time_step_rank": 8, "ssm.group_count": 2, "feed_forward_length": 0,
        "attention.head_count": 0, "vocab_size": 112}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    mixer = model.backbone.layers[1].mixer
    # A is stored as -exp(A_log), (heads, 1); dt_bias is the ssm_dt bias; the group norm is (groups, d/groups)
    np.testing.assert_allclose(np.asarray(tensors["blk.1.ssm_a"].data).reshape(-1),
                               (-torch.exp(mixer.A_log)).detach().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ssm_dt.bias"].data), mixer.dt_bias.detach().numpy())
    assert list(tensors["blk.1.ssm_norm.weight"].data.shape) == [2, 64]
    assert list(tensors["blk.1.ssm_conv1d.weight"].data.shape) == [mixer.conv_dim, 4]  # squeezed
    embd = np.asarray(tensors["token_embd.weight"].data)
    assert embd.shape == (112, 64) and not embd[100:].any()  # padded rows are zeros
    shakespeare = MODELS["mamba"]()  # tied: no output tensor, llama.cpp reuses token_embd
    export_gguf(shakespeare, tmp_path / "m1.gguf")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m1.gguf").tensors}
    assert "output.weight" not in names and {"blk.3.ssm_x.weight", "blk.3.ssm_dt.bias", "output_norm.weight"} <= names


def test_gguf_refuses_what_llamacpp_does_not_compute(tmp_path):
    from leanseq.models.mamba import MambaConfig, MambaLM

    lti = MambaLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1, selective=False))
    with pytest.raises(UnsupportedExportError, match="LTI.*--format onnx"):
        export_gguf(lti, tmp_path / "lti.gguf")
    clamped = tiny_mamba2()
    clamped.config.time_step_limit = (0.0, 0.5)
    with pytest.raises(UnsupportedExportError, match="time_step_limit.*ONNX"):
        export_gguf(clamped, tmp_path / "clamped.gguf")
    assert not list(tmp_path.iterdir())  # nothing written


@needs_llamacpp
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_llamacpp_runs_the_exported_gguf_with_leansegs_logits(tmp_path, family):
    model = MODELS[family]()
    path = tmp_path / f"{family}.gguf"
    export_gguf(model, path)
    out = tmp_path / "logits.f32"
    proc = subprocess.run([str(vs.binaries(CACHE)["logits"]), str(path), "1", str(NEW), str(out),
                           ",".join(map(str, PROMPT))], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT]))[0, -1].numpy()
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, ignore_eos=True)[0, len(PROMPT):]
    got = np.fromfile(out, dtype=np.float32)
    V = model.vocab_size
    assert got.shape[0] == theirs["n_vocab"] >= V
    # float32 in two libraries, summed in other orders: agree to 1e-5 of the logits' scale
    assert np.abs(got[:V] - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert not got[V:].any()  # the padded ids: zero rows, logit exactly 0
    assert theirs["tokens"] == greedy.tolist()


def converter_checkpoints(folder: Path) -> dict[str, Path]:
    """One small checkpoint per family, saved by leanseq in the Hugging Face layout the converter reads
    (vocabularies already multiples of 8 / 16, so neither side pads)."""
    from leanseq.models.mamba import MambaConfig, MambaLM
    from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(1)
    models = {"mamba": MambaLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2)),
              "mamba2": Mamba2LM(Mamba2Config(vocab_size=96, hidden_size=32, num_heads=4, head_dim=16,
                                              state_size=8, n_groups=2, num_hidden_layers=2))}
    out = {}
    for family, model in models.items():
        model.save_pretrained(folder / family)
        out[family] = folder / family
    return out


@needs_llamacpp
def test_gguf_equals_llamacpps_own_converter_for_the_same_weights(tmp_path):
    converter = vs.llama_src(CACHE) / "convert_hf_to_gguf.py"
    if not converter.is_file():
        pytest.skip(f"llama.cpp's converter is not in {converter.parent}")
    pytest.importorskip("transformers")  # the converter imports it
    jobs = {}
    for family, ckpt in converter_checkpoints(tmp_path).items():  # both converters run side by side
        theirs = tmp_path / f"{family}-converter.gguf"
        jobs[family] = (ckpt, theirs, subprocess.Popen(
            [sys.executable, str(converter), str(ckpt), "--outfile", str(theirs), "--outtype", "f32"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=vs.converter_env(CACHE)))
    for family, (ckpt, theirs, proc) in jobs.items():
        ours = tmp_path / f"{family}-leanseq.gguf"
        export_gguf(leanseq.load(ckpt), ours, name=ckpt.name)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        a, b = fields(theirs), fields(ours)
        # the tokenizer is where the files differ by design (see leanseq.post.gguf_export)
        assert {k for k in a if not k.startswith("tokenizer.")} <= set(b)
        assert set(b) - set(a) == {f"{family}.vocab_size"}
        general = {"general.name", "general.basename", "general.finetune"}
        for key in sorted(set(a) & set(b) - general):
            if not key.startswith("tokenizer."):
                assert a[key] == b[key], key
        ta = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        tb = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        assert set(ta) == set(tb)
        for name, t in ta.items():
            assert list(t.shape) == list(tb[name].shape) and t.tensor_type == tb[name].tensor_type, name
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(tb[name].data), err_msg=name)
