"""int8 checkpoints: save, load back, keep the model contract; wrong loads refused; torch.ao dynamic models run."""

import copy
import json
import warnings

import pytest
import torch

import leanseq
from leanseq.cli import main
from leanseq.models import CheckpointError
from leanseq.ops import decode
from leanseq.ops.quant import Int8Embedding, Int8Linear, quantize_int8
from leanseq.stream import Session


@pytest.mark.parametrize("family", ["mamba", "mamba2", "transformer"])
def test_int8_model_saves_and_loads_back_with_the_same_logits(make, family, tmp_path):
    q = quantize_int8(make(family), include_small=True)
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = q(ids)
    q.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    record = config["quantization_config"]
    assert record["quant_method"] == "leanseq_int8" and record["modules"]["lm_head"] == "linear"
    # loaders that do not know the int8 format (transformers, llama.cpp's converter) see an unknown model_type
    # and refuse, instead of filling the missing float weights with random ones
    assert config["model_type"] == "leanseq_int8" and record["model_type"] == q.config.model_type
    assert config["architectures"] == []
    loaded = leanseq.load(tmp_path / "q")
    assert isinstance(loaded.lm_head, Int8Linear) and loaded.lm_head.qweight.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), before, rtol=0, atol=0)
    # int8 weights plus float32 scales: over 3x smaller than the float32 weights they replace
    assert loaded.lm_head.qweight.nbytes * 3 < loaded.lm_head.in_features * loaded.lm_head.out_features * 4


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_int8_mamba_keeps_the_contract_tied_embeddings_read_the_int8_head(make, family, tmp_path):
    model = make(family, tied=True)
    q = quantize_int8(copy.deepcopy(model))
    assert isinstance(q.backbone.embeddings, Int8Embedding) and q.backbone.embeddings.qweight is q.lm_head.qweight
    q.save_pretrained(tmp_path / "q")
    loaded = leanseq.load(tmp_path / "q")
    assert loaded.backbone.embeddings.qweight is loaded.lm_head.qweight  # stored once, tied again on load
    ids = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, full_state = loaded(ids, return_state=True)
        assert float((full - model(ids)).abs().max()) < 0.05 * float(model(ids).abs().max())
        for native in (True, False):
            decode.set_enabled(native)
            try:
                state, steps = loaded.init_state(2), []
                for t in range(ids.shape[1]):
                    logits, state = loaded.step(ids[:, t], state)
                    steps.append(logits)
            finally:
                decode.set_enabled(None)
            torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(state.ssm, full_state.ssm, rtol=1e-4, atol=1e-4)
    assert decode.plan_for(loaded).error is None  # the native step reads the int8 embedding rows
    session = Session(loaded)
    session.push(ids[0, :6])
    torch.testing.assert_close(session.push(ids[0, 6:])[-1], full[0, -1], rtol=1e-4, atol=1e-4)
    out = loaded.generate(ids[:1, :4], 5, temperature=0, ignore_eos=True)
    assert out.shape == (1, 9)


def test_load_refuses_int8_files_loaded_the_wrong_way(make, tmp_path):
    quantize_int8(make("mamba")).save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="computes in float32; load it without dtype"):
        leanseq.load(tmp_path / "q", dtype=torch.bfloat16)
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    record = config.pop("quantization_config")
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="int8 checkpoint.* but has no quantization_config"):
        leanseq.load(tmp_path / "q")
    config_file.write_text(json.dumps({**config, "model_type": "mamba"}))  # made to look like a float checkpoint
    with pytest.raises(CheckpointError, match="holds int8 tensors .* no quantization_config"):
        leanseq.load(tmp_path / "q")
    config["quantization_config"] = {**record, "modules": {**record["modules"], "backbone.layers.9.mixer.in_proj": "linear"}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no Linear of that name"):
        leanseq.load(tmp_path / "q")
    config["quantization_config"] = {**record, "quant_method": "gptq"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="leanseq loads only 'leanseq_int8'"):
        leanseq.load(tmp_path / "q")


def test_quantizing_twice_is_refused(make):
    q = quantize_int8(make("mamba"))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int8(q)


def test_torch_dynamic_quantization_runs_forward_and_step_and_refuses_to_save(make, tmp_path):
    """torch.ao quantize_dynamic made `lm_head.weight` a method; forward used to fail on `.dtype` of it. Its
    activation scales depend on the rows quantised together, so step and forward agree only approximately."""
    model = make("mamba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    ids = torch.randint(0, 37, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = dq(ids)
        state, steps = dq.init_state(1), []
        for t in range(8):
            logits, state = dq.step(ids[:, t], state)
            steps.append(logits)
    with torch.no_grad():
        ref = model(ids)
    assert float((full - ref).abs().max()) < 0.1 * float(ref.abs().max())
    assert float((torch.stack(steps, 1) - full).abs().max()) < 0.02 * float(ref.abs().max())
    with pytest.raises(TypeError, match="no checkpoint form"):
        dq.save_pretrained(tmp_path / "dq")


def test_quantize_command_writes_a_loadable_checkpoint_and_report(tmp_path, capsys):
    src = leanseq.__path__[0] + "/data/induction-mamba"
    rc = main(["quantize", src, "--out", str(tmp_path / "q"), "--quick", "--no-progress", "--threads", "1",
               "--task", "induction_heads", "--task-set", "seq_len=64"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| int8 |" in table and "x smaller" in table
    report = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    int8 = report["rows"]["int8"]
    assert int8["disk_ratio"] > 2.5 and abs(int8["accuracy_change_points"]) <= 10
    assert isinstance(leanseq.load(tmp_path / "q").lm_head, Int8Linear)
    # a quantised checkpoint is not quantised again
    assert main(["quantize", str(tmp_path / "q"), "--quick", "--no-progress"]) == 1
    assert "already int8" in capsys.readouterr().err
