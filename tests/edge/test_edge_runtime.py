"""leanseq.edge: an exported model streamed, saved, restored and generating text in a process without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import leanseq
from leanseq.models.commands import bundled_checkpoint

pytest.importorskip("onnxruntime")

from leanseq.edge import EdgeModel, EdgeModelError, EdgeSession, EdgeStateError
from leanseq.post.onnx_export import export_onnx
from leanseq.text.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
PROMPT = "ROMEO:"
NEW_TOKENS = 40

# Runs first in the child: any import of torch (or a torch submodule) raises, as on a device without it.
TORCH_BLOCKER = textwrap.dedent("""
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is not installed on this device (blocked import of {name})")
            return None
    sys.meta_path.insert(0, NoTorch())
    sys.modules.pop("torch", None)
""")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """The bundled byte-level Shakespeare Mamba, eager and exported (with its tokenizer)."""
    src = bundled_checkpoint("shakespeare-mamba")
    model = leanseq.load(src)
    folder = tmp_path_factory.mktemp("edge") / "shakespeare-onnx"
    export_onnx(model, folder, prefill_chunk=16, tokenizer=load_tokenizer(src), progress=False)
    return model, load_tokenizer(src), folder


def _torch_greedy(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, ignore_eos=True)
    return tok.decode(out[0, ids.shape[1]:].tolist())


def test_edge_runtime_generates_saves_and_restores_in_a_process_where_torch_cannot_import(shakespeare, tmp_path):
    model, tok, folder = shakespeare
    child = TORCH_BLOCKER + textwrap.dedent(f"""
        import json, sys
        try:
            import torch
        except ImportError:
            pass
        else:
            sys.exit("the blocker did not block torch")
        from leanseq.edge import EdgeModel, EdgeSession
        model = EdgeModel({str(folder)!r}, threads=1)
        s = EdgeSession(model)
        text = s.generate({PROMPT!r}, max_new_tokens={NEW_TOKENS}, stop_at_eos=False)
        s.save({str(tmp_path / "mid.lsqe")!r})
        after = [s.generate(max_new_tokens=12, stop_at_eos=False)]
        again = EdgeSession.load(model, {str(tmp_path / "mid.lsqe")!r})
        after.append(again.generate(max_new_tokens=12, stop_at_eos=False))
        print(json.dumps({{"text": text, "after": after, "position": again.position,
                          "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch_loaded"] is False
    assert got["text"] == _torch_greedy(model, tok, PROMPT, NEW_TOKENS)  # greedy: the same text as PyTorch
    assert got["after"][0] == got["after"][1] and got["after"][0]  # restored stream continues identically
    assert got["position"] == len(tok.encode(PROMPT)) + NEW_TOKENS + 12


def test_restored_session_gives_identical_logits_and_bad_state_files_are_refused(shakespeare, tmp_path):
    _, tok, folder = shakespeare
    model = EdgeModel(folder, threads=1)
    s = EdgeSession(model)
    s.push(tok.encode("JULIET: O Romeo"))
    path = s.save(tmp_path / "s.lsqe")
    blob = path.read_bytes()
    nxt = s.push(ord("!"))
    again = EdgeSession.restore(model, blob)
    np.testing.assert_array_equal(again.push(ord("!")), nxt)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    with pytest.raises(EdgeStateError, match="checksum"):
        EdgeSession.restore(model, bytes(flipped))
    with pytest.raises(EdgeStateError, match="truncated|checksum"):
        EdgeSession.restore(model, blob[:-40])
    with pytest.raises(EdgeStateError, match="not a leanseq edge stream"):
        EdgeSession.restore(model, b"PK\x03\x04" + blob[4:])
    other = leanseq.load(bundled_checkpoint("tiny-mamba"))
    other_folder = tmp_path / "other"
    export_onnx(other, other_folder, prefill_chunk=0, progress=False)
    with pytest.raises(EdgeStateError, match="another exported model"):
        EdgeSession.restore(EdgeModel(other_folder), blob)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic save left no scratch file


def test_tampered_or_incomplete_exports_and_bad_inputs_are_refused(shakespeare, tmp_path):
    import shutil

    _, _, folder = shakespeare
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    model = EdgeModel(copy)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.step(np.array([model.vocab_size]), model.init_state(1))
    bad = model.init_state(1)
    bad["ssm"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="'ssm' holds NaN"):
        model.step(np.array([1]), bad)
    with pytest.raises(ValueError, match="'conv' is float32"):
        model.step(np.array([1]), model.init_state(1) | {"conv": model.init_state(2)["conv"]})
    data = bytearray((copy / "step.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "step.onnx").write_bytes(bytes(data))
    with pytest.raises(EdgeModelError, match="sha256 differs"):
        EdgeModel(copy)
    (copy / "step.onnx").unlink()
    with pytest.raises(EdgeModelError, match="step.onnx is missing"):
        EdgeModel(copy)
    manifest = json.loads((copy / "edge.json").read_text())
    (copy / "edge.json").write_text(json.dumps(manifest | {"version": 99}))
    with pytest.raises(EdgeModelError, match="manifest version 99"):
        EdgeModel(copy)
    graphs = manifest["graphs"] | {"step": {"file": "../step.onnx"}}
    (copy / "edge.json").write_text(json.dumps(manifest | {"graphs": graphs}))
    with pytest.raises(EdgeModelError, match="must name a file listed"):
        EdgeModel(copy)
    with pytest.raises(EdgeModelError, match="no edge.json"):
        EdgeModel(tmp_path)


def test_edge_module_command_generates_text(shakespeare, tmp_path):
    _, _, folder = shakespeare
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "leanseq.edge", str(folder), "--prompt", PROMPT,
                           "--max-new-tokens", "16", "--threads", "1", "--state-out", str(tmp_path / "s.lsqe")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT) and len(proc.stdout) > len(PROMPT)
    assert (tmp_path / "s.lsqe").is_file()
    proc = subprocess.run([sys.executable, "-m", "leanseq.edge", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 1 and "no edge.json" in proc.stderr
