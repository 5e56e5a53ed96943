"""Original state-spaces checkpoints (mamba_ssm's `pytorch_model.bin` + `config.json` with d_model, n_layer, ...).

The config is translated to transformers' keys the way transformers' own conversion script does (hidden_size =
d_model, intermediate_size = expand * d_model, the vocabulary padded up to pad_vocab_size_multiple), and the
one tensor whose name differs is renamed (`backbone.embedding.weight` -> `backbone.embeddings.weight`).

The .bin is a pickle. It is read with torch.load(weights_only=True), PyTorch's restricted unpickler that only
rebuilds tensors and plain containers: a file that needs anything else (a class, a function) is refused
instead of being run.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import torch

from leanseq.models import checkpoint as ckpt

BIN_FILE = "pytorch_model.bin"
# mamba_ssm's MambaConfig fields that only choose kernels or are defaults leanseq follows anyway
_IGNORED = {"fused_add_norm", "residual_in_fp32", "pad_vocab_size_multiple", "ssm_cfg", "d_model", "n_layer",
            "vocab_size", "rms_norm", "tie_embeddings", "attn_layer_idx", "attn_cfg", "d_intermediate"}


def is_original_config(config: dict) -> bool:
    """A mamba_ssm config.json: no model_type, but d_model and n_layer."""
    return "model_type" not in config and "d_model" in config and "n_layer" in config


def _int(config: dict, key: str, where: str):
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ckpt.CheckpointError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
    return value


def hf_config(config: dict, where: str) -> dict:
    """A mamba_ssm config.json -> the equivalent transformers `mamba` / `mamba2` config dict."""
    ssm = config.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise ckpt.CheckpointError(f"{where}: ssm_cfg must be a mapping, got {ssm!r}")
    if config.get("attn_layer_idx"):
        raise ckpt.CheckpointError(f"{where}: hybrid checkpoints with attention layers (attn_layer_idx) are not "
                                   "supported")
    if config.get("d_intermediate"):
        raise ckpt.CheckpointError(f"{where}: checkpoints with an MLP after each mixer (d_intermediate > 0) are "
                                   "not supported")
    d_model, n_layer = _int(config, "d_model", where), _int(config, "n_layer", where)
    vocab, multiple = _int(config, "vocab_size", where), config.get("pad_vocab_size_multiple", 8)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ckpt.CheckpointError(f"{where}: pad_vocab_size_multiple must be a positive integer, got {multiple!r}")
    vocab = math.ceil(vocab / multiple) * multiple  # the embedding has the padded number of rows
    layer = ssm.get("layer", "Mamba1")
    expand = ssm.get("expand", 2)
    common = {
        "hidden_size": d_model, "num_hidden_layers": n_layer, "vocab_size": vocab, "expand": expand,
        "conv_kernel": ssm.get("d_conv", 4), "use_bias": ssm.get("bias", False),
        "use_conv_bias": ssm.get("conv_bias", True), "residual_in_fp32": config.get("residual_in_fp32", True),
        "tie_word_embeddings": config.get("tie_embeddings", True),
    }
    if not config.get("rms_norm", True):
        raise ckpt.CheckpointError(f"{where}: rms_norm is false (LayerNorm); only RMSNorm Mamba checkpoints are "
                                   "supported")
    if layer == "Mamba1":
        unknown = set(ssm) - {"layer", "d_state", "d_conv", "expand", "dt_rank", "bias", "conv_bias", "dt_min",
                              "dt_max", "dt_init_floor", "dt_scale", "dt_init"}
        rank = ssm.get("dt_rank", "auto")
        return {"model_type": "mamba", **common, "state_size": ssm.get("d_state", 16),
                "intermediate_size": int(expand * d_model),
                "time_step_rank": math.ceil(d_model / 16) if rank == "auto" else rank, **_unknown(unknown, where)}
    if layer == "Mamba2":
        unknown = set(ssm) - {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "bias",
                              "conv_bias", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "rmsnorm",
                              "norm_before_gate", "d_ssm"}
        if ssm.get("norm_before_gate", False) or not ssm.get("rmsnorm", True):
            raise ckpt.CheckpointError(f"{where}: only Mamba2 layers with rmsnorm=true and norm_before_gate=false "
                                       "(mamba_ssm's defaults, as in transformers) are supported")
        head_dim = ssm.get("headdim", 64)
        return {"model_type": "mamba2", **common, "state_size": ssm.get("d_state", 128), "head_dim": head_dim,
                "num_heads": int(expand * d_model) // head_dim, "n_groups": ssm.get("ngroups", 1),
                "chunk_size": ssm.get("chunk_size", 256), **_unknown(unknown, where)}
    raise ckpt.CheckpointError(f"{where}: ssm_cfg layer {layer!r} is not supported (Mamba1 or Mamba2)")


def _unknown(keys: set, where: str) -> dict:
    if keys:  # a silently dropped setting would change the model
        raise ckpt.CheckpointError(f"{where}: unsupported ssm_cfg keys {sorted(keys)}")
    return {}


def read_bin(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle, through the restricted (weights-only) unpickler; nothing else is run."""
    fd = ckpt._open_regular_file(file, "an original Mamba checkpoint needs pytorch_model.bin (a regular file)")
    try:
        with os.fdopen(fd, "rb") as fh:
            data = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ckpt.CheckpointError(
            f"{file} needs more than tensors to unpickle, so it is refused (leanseq only reads pickles with "
            f"torch.load(weights_only=True), which never runs code from the file): {first}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"cannot read {file}: it is corrupt or not a PyTorch checkpoint ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # some training scripts wrap the state dict
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ckpt.CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return data


def load_original(folder: str | os.PathLike, config: dict, device=None, dtype: torch.dtype | None = None):
    """A state-spaces (mamba_ssm) checkpoint folder -> the equivalent leanseq model, in eval mode."""
    from leanseq.models import model_class

    folder = Path(folder)
    where = str(folder / ckpt.CONFIG_FILE)
    translated = hf_config(config, where)
    cls = model_class(translated["model_type"])
    model_config = cls.config_class.from_dict(translated)
    tensors = read_bin(folder / BIN_FILE)
    if "backbone.embedding.weight" in tensors:
        tensors["backbone.embeddings.weight"] = tensors.pop("backbone.embedding.weight")
    if model_config.num_hidden_layers > len(tensors):  # bounds the model built below by what the file holds
        raise ckpt.CheckpointError(f"{where} says n_layer={model_config.num_hidden_layers}, but {BIN_FILE} holds "
                                   f"only {len(tensors)} tensors")
    with torch.device("meta"):
        model = cls(model_config)
    if model_config.tie_word_embeddings and "lm_head.weight" in tensors:
        tied = tensors.pop("lm_head.weight")
        if not torch.equal(tied, tensors.get("backbone.embeddings.weight", tied)):
            raise ckpt.CheckpointError(f"{where}: tie_embeddings is true but lm_head.weight differs from the "
                                       "embedding")
    float_dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    target = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    for k, v in tensors.items():
        if v.is_floating_point():
            tensors[k] = v.to(target)
    ckpt.load_state_dict_strict(model, tensors, optional=model._tied_keys(), assign=True)
    model.generation_config = ckpt.read_generation_config(folder)
    if device is not None:
        model.to(device)
    return model.eval()
