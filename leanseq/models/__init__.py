"""Model families behind one contract (see base.py), and `load` for any checkpoint folder."""

from __future__ import annotations

import importlib
import os

from leanseq.models.checkpoint import CheckpointError, read_config, read_consistently
from leanseq.models.config import ConfigError
from leanseq.models.state import State

# model_type in config.json -> (module, class). Imported on use so one family's import cost is not everyone's.
MODEL_TYPES = {
    "mamba": ("leanseq.models.mamba", "MambaLM"),
    "leanseq_mamba_lti": ("leanseq.models.mamba", "MambaLM"),
    "mamba2": ("leanseq.models.mamba2", "Mamba2LM"),
    "llama": ("leanseq.models.transformer", "TransformerLM"),
    "leanseq_transformer": ("leanseq.models.transformer", "TransformerLM"),
}


def model_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"unknown model_type {model_type!r}; leanseq loads: {', '.join(sorted(MODEL_TYPES))}"
        )
    module, name = MODEL_TYPES[model_type]
    return getattr(importlib.import_module(module), name)


def load(path: str | os.PathLike, device=None, dtype=None):
    """A checkpoint -> model in eval mode. `path` is a folder (config.json + safetensors, single or sharded, or
    an original state-spaces `pytorch_model.bin`, read without unrestricted pickle) or a Hugging Face Hub id
    found in the local cache (see leanseq.models.hub).

    Safe while another process re-saves the folder: config and tensors come from one saved version.
    """
    from leanseq.models import hub, original

    path = hub.resolve(path)

    def load_version(folder):
        if os.path.isfile(os.path.join(folder, "adapter_config.json")) and \
                not os.path.exists(os.path.join(folder, "config.json")):
            raise CheckpointError(
                f"{folder} holds a LoRA adapter (peft's adapter_config.json), not a model: load its base model "
                "with leanseq.load and put the adapter on it with leanseq.post.lora.load_adapter, or merge it into "
                "a checkpoint (`leanseq finetune --merge`, leanseq.post.lora.merge_adapter)")
        config = read_config(folder)
        if original.is_original_config(config):
            return original.load_original(folder, config, device=device, dtype=dtype)
        if "model_type" not in config:
            raise CheckpointError(
                f"{folder}/config.json has no model_type; leanseq loads: {', '.join(sorted(MODEL_TYPES))}")
        model_type = config["model_type"]
        from leanseq.ops.quant import QUANTIZED_MODEL_TYPE

        if model_type == QUANTIZED_MODEL_TYPE:  # an int8 checkpoint names its family in its quantization record
            record = config.get("quantization_config")
            if not isinstance(record, dict):
                raise CheckpointError(f"{folder}/config.json says model_type {QUANTIZED_MODEL_TYPE!r} (an int8 "
                                      "checkpoint) but has no quantization_config: restore the one `leanseq "
                                      "quantize` wrote there, or load the float32 checkpoint instead")
            model_type = record.get("model_type")
            if model_type not in MODEL_TYPES:
                raise CheckpointError(f"{folder}/config.json is an int8 checkpoint whose quantization_config names "
                                      f"no known model_type ({model_type!r}); leanseq loads: "
                                      f"{', '.join(sorted(MODEL_TYPES))}")
        return model_class(model_type).from_pretrained(folder, device=device, dtype=dtype)

    return read_consistently(path, load_version)


def __getattr__(name):
    lazy = {
        "MambaLM": "leanseq.models.mamba", "MambaConfig": "leanseq.models.mamba",
        "Mamba2LM": "leanseq.models.mamba2", "Mamba2Config": "leanseq.models.mamba2",
        "TransformerLM": "leanseq.models.transformer", "TransformerConfig": "leanseq.models.transformer",
    }
    if name in lazy:
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(name)


__all__ = ["MODEL_TYPES", "CheckpointError", "ConfigError", "State", "load", "model_class"]
