"""Export a Mamba-1 or Mamba-2 model to GGUF, the file llama.cpp runs, through the `gguf` package.

    export_gguf(model, "out/model.gguf")

The file follows what llama.cpp's own converter (convert_hf_to_gguf.py, conversion/mamba.py) writes for the
same weights, so llama.cpp loads it as one of its own:
- architecture `mamba` or `mamba2`; metadata {arch}.context_length (2**20, as the converter: a recurrent
  model has no limit), embedding_length, feed_forward_length 0, head_count 0, block_count, ssm.conv_kernel,
  ssm.inner_size, ssm.state_size, ssm.time_step_rank (Mamba-2: the number of heads), ssm.group_count
  (Mamba-2), ssm.dt_b_c_rms false (Mamba-1), layer_norm_rms_eps, general.file_type (all float32);
- tensor names from the gguf package's own name map (the converter's): token_embd, blk.N.attn_norm, ssm_in,
  ssm_conv1d (squeezed to (channels, kernel)), ssm_x, ssm_dt (Mamba-2's dt_bias becomes ssm_dt.bias), ssm_a
  (stored as A = -exp(A_log); Mamba-2's as (heads, 1)), ssm_d, ssm_norm (Mamba-2, (groups, d_inner/groups)),
  ssm_out, output_norm, output (left out when tied to the embedding: llama.cpp then reuses token_embd);
- the vocabulary padded to a multiple of 8 (Mamba-1) or 16 (Mamba-2), as the converter pads it; padded rows of
  the embedding and LM head are zeros, so their logits are exactly 0.

Where this file departs from the converter's: the tokenizer. The converter writes the bundled GPT-NeoX
vocabulary when a checkpoint has no tokenizer files; leanseq models carry their own (often the byte
tokenizer), so this writes `tokenizer.ggml.model = "none"` with {arch}.vocab_size: llama.cpp then runs the
model on token ids (llama_decode, llama-cpp-python's eval), and text goes through leanseq's tokenizer.
A model without a conv bias gets a zero ssm_conv1d.bias (llama.cpp requires one; adding 0 changes nothing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from leanseq.post.exportable import check_exportable

CONTEXT_LENGTH = 2**20  # what the converter writes for Mamba models
VOCAB_MULTIPLE = {"mamba": 8, "mamba2": 16}


def padded_vocab(model_type: str, vocab_size: int) -> int:
    m = VOCAB_MULTIPLE[model_type]
    return -(vocab_size // -m) * m


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, transformed as llama.cpp's converter transforms the Hugging Face tensors."""
    import gguf

    cfg = model.config
    family = cfg.model_type
    arch = gguf.MODEL_ARCH.MAMBA if family == "mamba" else gguf.MODEL_ARCH.MAMBA2
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    vocab = padded_vocab(family, cfg.vocab_size)
    tied = model.lm_head.weight is model.backbone.embeddings.weight
    out: dict[str, np.ndarray] = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp duplicates token_embd when there is no output tensor
        data = t.detach().float().cpu()
        if hf_name.endswith(".dt_bias"):  # Mamba-2: the converter renames it to the dt_proj bias
            hf_name = hf_name[: -len("dt_bias")] + "dt_proj.bias"
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of this {family} model")
        if hf_name.endswith(".A_log"):
            data = -torch.exp(data)
        if ".ssm_conv1d." in f".{new}." and new.endswith(".weight"):
            data = data.squeeze(1)  # (C, 1, K) -> (C, K)
        if family == "mamba2":
            if hf_name.endswith((".A_log", ".D")):
                data = data.reshape(-1, 1)  # (heads, 1): the converter's shape, like Mamba-1's (d_inner, N)
            elif new.endswith("ssm_norm.weight"):
                data = data.reshape(cfg.n_groups, cfg.intermediate_size // cfg.n_groups)
        if new in ("token_embd.weight", "output.weight") and data.shape[0] < vocab:
            data = torch.cat([data, data.new_zeros(vocab - data.shape[0], data.shape[1])])
        out[new] = np.ascontiguousarray(data.numpy().astype(np.float32))
    if not cfg.use_conv_bias:
        for i, block in enumerate(model.backbone.layers):
            out[f"blk.{i}.ssm_conv1d.bias"] = np.zeros(block.mixer.conv1d.weight.shape[0], np.float32)
    return out


def gguf_metadata(model) -> dict[str, object]:
    """The architecture's metadata keys (without the `{arch}.` prefix) and their values, as the converter's."""
    cfg = model.config
    meta = {
        "context_length": CONTEXT_LENGTH,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": 0,
        "attention.head_count": 0,
        "block_count": cfg.num_hidden_layers,
        "ssm.conv_kernel": cfg.conv_kernel,
        "ssm.inner_size": cfg.intermediate_size,
        "ssm.state_size": cfg.state_size,
        "attention.layer_norm_rms_epsilon": float(cfg.layer_norm_epsilon),
    }
    if cfg.model_type == "mamba":
        meta["ssm.time_step_rank"] = cfg.time_step_rank
        meta["ssm.dt_b_c_rms"] = False
    else:
        meta["ssm.time_step_rank"] = cfg.intermediate_size // cfg.head_dim
        meta["ssm.group_count"] = cfg.n_groups
    return meta


def export_gguf(model, path: str | os.PathLike, name: str | None = None) -> dict:
    """Write `model` as an all-float32 GGUF file at `path` (atomically). Returns a summary: architecture,
    vocabulary (padded), tensor count, bytes. Raises UnsupportedExportError (a ValueError) for what llama.cpp's
    Mamba graphs do not compute (see leanseq.post.exportable)."""
    import gguf

    check_exportable(model, "gguf")
    cfg = model.config
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MAMBA if cfg.model_type == "mamba" else gguf.MODEL_ARCH.MAMBA2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = gguf_tensors(model)
    vocab = padded_vocab(cfg.model_type, cfg.vocab_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or path.stem)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(CONTEXT_LENGTH)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_ssm_conv_kernel(cfg.conv_kernel)
        w.add_ssm_inner_size(cfg.intermediate_size)
        w.add_ssm_state_size(cfg.state_size)
        w.add_layer_norm_rms_eps(float(cfg.layer_norm_epsilon))
        if cfg.model_type == "mamba":
            w.add_ssm_time_step_rank(cfg.time_step_rank)
            w.add_ssm_dt_b_c_rms(False)
        else:
            w.add_ssm_time_step_rank(cfg.intermediate_size // cfg.head_dim)
            w.add_ssm_group_count(cfg.n_groups)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("none")
        w.add_vocab_size(vocab)
        for tname, data in tensors.items():
            w.add_tensor(tname, data)
        total, shared, expert, experts = w.get_total_parameter_count()
        w.add_size_label(gguf.size_label(total, shared, expert, experts))  # as the converter labels it
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(path), "architecture": arch, "vocab_size": cfg.vocab_size, "gguf_vocab_size": vocab,
            "tensors": len(tensors), "bytes": path.stat().st_size}
