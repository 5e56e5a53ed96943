"""ONNX export: the step and prefill graphs stream like eager PyTorch, the export switch, and the refusals."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import leanseq
from leanseq.models.commands import bundled_checkpoint
from leanseq.ops import decode, exporting, is_exporting, native

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from leanseq.post.exportable import UnsupportedExportError, check_exportable
from leanseq.post.onnx_export import export_onnx

# float32 sums in another order (onnxruntime vs torch): logits agree to this fraction of their largest magnitude
RTOL = 1e-4
GOLDEN_TOKENS = 1000


def tiny_mamba2(seed: int = 0):
    from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(seed)
    cfg = Mamba2Config(vocab_size=50, hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2,
                       num_hidden_layers=2)
    return Mamba2LM(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (eager model, exported folder): the bundled tiny Mamba-1 and a random tiny Mamba-2."""
    out = {}
    for family, model in (("mamba", leanseq.load(bundled_checkpoint("tiny-mamba"))), ("mamba2", tiny_mamba2())):
        folder = tmp_path_factory.mktemp(f"onnx-{family}") / "model"
        export_onnx(model, folder, prefill_chunk=8, progress=False)
        out[family] = (model, folder)
    return out


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_golden_1000_tokens_through_onnxruntime_match_eager_pytorch(exported, family):
    from leanseq.edge import EdgeModel

    model, folder = exported[family]
    edge = EdgeModel(folder, threads=1)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.vocab_size, size=(2, GOLDEN_TOKENS))  # 2 rows: the batch is dynamic
    state, edge_state = model.init_state(2), edge.init_state(2)
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        for t in range(GOLDEN_TOKENS):
            ref, state = model.step(torch.from_numpy(ids[:, t]), state)
            got, edge_state = edge.step(ids[:, t], edge_state, check=False)
            worst = max(worst, float(np.abs(got - ref.numpy()).max()))
            scale = max(scale, float(ref.abs().max()))
    assert worst <= RTOL * scale, f"max |logit diff| {worst:.3g} over {GOLDEN_TOKENS} tokens (scale {scale:.3g})"
    np.testing.assert_array_equal(edge_state["position"], state.position.numpy())
    np.testing.assert_allclose(edge_state["ssm"], state.ssm.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_prefill_graph_in_chunks_then_steps_equals_one_forward(exported, family):
    from leanseq.edge import EdgeModel

    model, folder = exported[family]
    edge = EdgeModel(folder, threads=1)
    ids = np.random.default_rng(2).integers(0, model.vocab_size, size=(3, 19))  # 2 chunks of 8, then 3 steps
    got, edge_state = edge.prefill(ids, edge.init_state(3))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), state=model.init_state(3))
    np.testing.assert_allclose(got, ref[:, -1].numpy(), rtol=0, atol=RTOL * max(1.0, float(ref.abs().max())))
    assert edge_state["position"].tolist() == [19, 19, 19]


def test_exporting_switch_turns_kernels_and_value_checks_off_then_back_on():
    model = leanseq.load(bundled_checkpoint("tiny-mamba"))
    bad = torch.tensor([model.vocab_size])  # outside the vocabulary
    assert not is_exporting()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.check_input_ids(bad, rank=1)
    seen_elsewhere = []
    with exporting():
        assert is_exporting() and not decode.enabled()
        assert not native.supports(torch.zeros(2))
        model.check_input_ids(bad, rank=1)  # a graph has no values to check: the range test steps aside
        with exporting():  # nests
            assert is_exporting()
        assert is_exporting()
        worker = threading.Thread(target=lambda: seen_elsewhere.append(is_exporting()))
        worker.start()
        worker.join()
    assert seen_elsewhere == [False]  # per thread: another thread's eager steps keep kernels and checks
    with pytest.raises(RuntimeError), exporting():
        raise RuntimeError("an export that fails")
    assert not is_exporting()  # switched back off even after an error
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.check_input_ids(bad, rank=1)


def test_export_refuses_other_families_quantized_and_half_models_saying_what_to_do(tmp_path):
    transformer = leanseq.load(bundled_checkpoint("induction-transformer"))
    with pytest.raises(UnsupportedExportError, match="only Mamba-1 and Mamba-2.*leanseq generate"):
        export_onnx(transformer, tmp_path / "t")
    with pytest.raises(UnsupportedExportError, match="convert_hf_to_gguf"):
        check_exportable(transformer, "gguf")
    from leanseq.ops.quant import quantize_int8

    int8 = quantize_int8(leanseq.load(bundled_checkpoint("tiny-mamba")))
    with pytest.raises(UnsupportedExportError, match="float32 model.*onnxruntime.quantization"):
        export_onnx(int8, tmp_path / "q")
    half = leanseq.load(bundled_checkpoint("tiny-mamba")).to(torch.bfloat16)
    with pytest.raises(UnsupportedExportError, match="bfloat16.*float32"):
        export_onnx(half, tmp_path / "h")
    model = leanseq.load(bundled_checkpoint("tiny-mamba"))
    with pytest.raises(ValueError, match="prefill_chunk"):
        export_onnx(model, tmp_path / "p", prefill_chunk=-1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export_onnx(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no scratch folder left behind


def test_cli_export_onnx_then_refusal(tmp_path, capsys):
    from leanseq.cli import main

    out = tmp_path / "tiny-onnx"
    assert main(["export", str(bundled_checkpoint("tiny-mamba")), "--format", "onnx", "--out", str(out),
                 "--prefill-chunk", "0"]) == 0
    text = capsys.readouterr().out
    assert "max |logit difference|" in text and "python -m leanseq.edge" in text
    assert sorted(p.name for p in out.iterdir()) == ["edge.json", "step.onnx"]
    assert main(["export", str(bundled_checkpoint("induction-transformer")), "--format", "onnx",
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "leanseq export: error: cannot export a 'llama' model to onnx" in err


def test_torch_export_of_model_step_needs_no_switch_and_matches_eager():
    """torch.export.export stopped at the input check's .item() and at the C kernel: under its trace
    (torch.compiler.is_exporting) both step aside by themselves."""
    from leanseq.post.onnx_export import _StepGraph

    model = leanseq.load(bundled_checkpoint("tiny-mamba"))
    s = model.init_state(2)
    program = torch.export.export(_StepGraph(model), (torch.tensor([1, 2]), s.position, s.conv, s.ssm))
    state = model.init_state(2)
    with torch.no_grad():
        state = model.step(torch.tensor([5, 6]), state)[1]
        logits, position, *_ = program.module()(torch.tensor([3, 4]), state.position, state.conv, state.ssm)
        ref, ref_state = model.step(torch.tensor([3, 4]), state)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert position.tolist() == ref_state.position.tolist() == [2, 2]
