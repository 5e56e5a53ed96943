"""Config dataclass helpers shared by every model family.

Field names and defaults follow the keys of Hugging Face's config.json for the family, so a checkpoint's
config loads as is. Keys every Hugging Face config carries (architectures, dtype, ...) are accepted and
ignored; any other unknown key is an error that names it, because a silently dropped key changes the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

# Keys written by transformers' PretrainedConfig for every model; they do not change the computation here.
GENERIC_HF_KEYS = frozenset(
    {
        "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "return_dict",
        "output_hidden_states", "output_attentions", "is_encoder_decoder", "initializer_range", "rescale_prenorm_residual", "time_step_init_scheme",
        "time_step_floor", "time_step_min", "time_step_max", "time_step_scale", "use_mambapy",
        "use_associative_scan", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
        "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
        "finetuning_task", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
        "is_decoder", "pruned_heads", "torchscript", "_name_or_path", "_attn_implementation_autoset",
        "layer_types", "pretraining_tp", "mlp_bias", "head_dim_", "auto_map", "quantization_config",
        "_commit_hash", "transformers.js_config", "output_router_logits",
    }
)


# Special-token ids: every family's config has them as fields (kept on load, written on save), because generation
# stops at eos_token_id and transformers reads them from config.json. eos may be a list (several end tokens).
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type."""


def check_number(key: str, value: float, *, above: float | None = None, at_least: float | None = None) -> None:
    """Raise a ConfigError naming `key` unless `value` is finite and > `above` / >= `at_least`.

    NaN passes every comparison unnoticed and an epsilon of 0 or a negative step size turns into NaN logits
    or a math domain error deep inside the model, so numbers are checked where the config is read.
    """
    if above is not None and not value > above:
        bound = f" > {above}"
    elif at_least is not None and not value >= at_least:
        bound = f" >= {at_least}"
    elif not math.isfinite(value):
        bound = ""
    else:
        return
    raise ConfigError(f"config key {key!r} must be a finite number{bound}, got {value!r}")


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Coerce JSON values to the field's type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key {name!r}: {value!r} is not of type {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {name!r} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {name!r} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {name!r} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {name!r} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} must be a list, got {value!r}")
        return list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a mapping, got {value!r}")
        return value
    return value


def check_ssm_numbers(cfg) -> None:
    """The numeric keys Mamba-1 and Mamba-2 configs share: time_step_rank, layer_norm_epsilon, the time-step
    range and floor, initializer_range (each refused naming its key)."""
    if cfg.time_step_rank < 1:
        raise ConfigError(f"config key 'time_step_rank' must be >= 1 or 'auto', got {cfg.time_step_rank}")
    check_number("layer_norm_epsilon", cfg.layer_norm_epsilon, above=0)
    check_number("time_step_min", cfg.time_step_min, above=0)
    check_number("time_step_max", cfg.time_step_max, at_least=cfg.time_step_min)
    check_number("time_step_floor", cfg.time_step_floor, at_least=0)
    check_number("initializer_range", cfg.initializer_range, at_least=0)


class ConfigBase:
    """Mixin for config dataclasses: strict from_dict / to_dict / JSON helpers."""

    model_type: typing.ClassVar[str] = ""
    # Older checkpoints name some fields differently (e.g. mamba-130m-hf carries d_model and n_layer beside
    # hidden_size and num_hidden_layers): legacy key -> field. A legacy value that disagrees is an error.
    key_aliases: typing.ClassVar[dict[str, str]] = {}
    # Keys that only steer how the original code ran (fused kernels), not what it computes.
    ignored_keys: typing.ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True):
        data = dict(data)
        for legacy, field in cls.key_aliases.items():
            if legacy in data:
                value = data.pop(legacy)
                if field in data and data[field] != value:
                    raise ConfigError(
                        f"config keys {legacy!r}={value!r} and {field!r}={data[field]!r} disagree; they name the same setting"
                    )
                data.setdefault(field, value)
        mt = data.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ConfigError(f"config has model_type {mt!r}, but {cls.__name__} expects {cls.model_type!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key in fields:
                kwargs[key] = _check_type(key, value, hints[key])
            elif key in GENERIC_HF_KEYS or key in cls.ignored_keys or key.startswith("_"):
                continue
            elif strict:
                known = ", ".join(sorted(fields))
                raise ConfigError(f"unknown config key {key!r} for {cls.model_type}; known keys: {known}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": self.model_type}
        out.update(dataclasses.asdict(self))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in SPECIAL_TOKEN_KEYS:
            # None where the family's default is None means "not stated": leave it out, as before these keys were
            # kept. (Mamba2Config defaults to 1/0/2 as transformers does, so there an explicit null is written.)
            if key in out and out[key] is None and defaults.get(key) is None:
                del out[key]
        return out

    def check_special_tokens(self) -> None:
        """Refuse special-token ids that are not non-negative integers (eos may be a non-empty list of them)."""
        for key in SPECIAL_TOKEN_KEYS:
            value = getattr(self, key, None)
            values = value if isinstance(value, list) and key == "eos_token_id" else [value]
            if value == [] or any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0)
                                  for v in values):
                raise ConfigError(f"config key {key!r} must be a token id (an integer >= 0) or null"
                                  f"{' or a non-empty list of ids' if key == 'eos_token_id' else ''}, got {value!r}")

    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (empty when none is stated)."""
        value = getattr(self, "eos_token_id", None)
        return [] if value is None else list(value) if isinstance(value, list) else [value]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
