"""Which model a benchmark runs: a checkpoint folder, or a shape spec like `mamba:hidden_size=64,num_hidden_layers=2`.

A spec names a family and overrides that family's tiny benchmark defaults (vocab 16, hidden 64, 2 layers), so
`transformer:num_hidden_layers=4` is the default tiny transformer with four layers. Unknown families, keys and
malformed items are errors that name the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from leanseq.models.config import ConfigError

# family -> (module, model class, config class, tiny defaults). The transformer's intermediate_size is chosen so
# its parameter count lands within ~7% of the default Mamba's (66.5k vs 71.0k with vocab 16, both tied).
FAMILIES = {
    "mamba": (
        "leanseq.models.mamba", "MambaLM", "MambaConfig",
        {"vocab_size": 16, "hidden_size": 64, "num_hidden_layers": 2},
    ),
    "mamba2": (
        "leanseq.models.mamba2", "Mamba2LM", "Mamba2Config",
        {"vocab_size": 16, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 8, "head_dim": 16,
         "state_size": 16, "n_groups": 1, "chunk_size": 64, "tie_word_embeddings": True},
    ),
    "transformer": (
        "leanseq.models.transformer", "TransformerLM", "TransformerConfig",
        {"vocab_size": 16, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 96, "tie_word_embeddings": True},
    ),
}
ALIASES = {"llama": "transformer"}
DEFAULT_MODEL_A = "mamba:hidden_size=64,num_hidden_layers=2"
DEFAULT_MODEL_B = "transformer:hidden_size=64,num_hidden_layers=2"


class ModelSpecError(ValueError):
    """A --model-a/--model-b value is neither a checkpoint folder nor a valid spec."""


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """'mamba:hidden_size=64,num_hidden_layers=2' -> ('mamba', {'hidden_size': 64, 'num_hidden_layers': 2})."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("empty model spec; use e.g. 'mamba:hidden_size=64,num_hidden_layers=2'")
    family, _, rest = spec.strip().partition(":")
    family = ALIASES.get(family.strip().lower(), family.strip().lower())
    if family not in FAMILIES:
        raise ModelSpecError(
            f"unknown model family {family!r} in spec {spec!r}; use one of {', '.join(sorted(FAMILIES))} "
            f"(e.g. 'mamba:hidden_size=64') or a checkpoint folder"
        )
    overrides: dict = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ModelSpecError(f"spec item {item!r} in {spec!r} is not key=value")
        if key == "model_type":
            raise ModelSpecError(f"spec {spec!r}: model_type comes from the family name, do not set it")
        if key in overrides:
            raise ModelSpecError(f"spec {spec!r} sets {key!r} twice")
        overrides[key] = _parse_value(value)
    return family, overrides


def build_from_spec(spec: str, seed: int = 0):
    """A freshly initialised (seeded) model in eval mode from a spec string."""
    import importlib

    family, overrides = parse_model_spec(spec)
    module, model_name, config_name, defaults = FAMILIES[family]
    mod = importlib.import_module(module)
    config_class = getattr(mod, config_name)
    data = {**defaults, **overrides}
    if family == "transformer" and data.get("position_embedding") == "absolute":
        data["model_type"] = "leanseq_transformer"
    try:
        config = config_class.from_dict(data)
    except ConfigError as exc:
        raise ModelSpecError(f"spec {spec!r}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a config's own checks, e.g. a non-positive size
        raise ModelSpecError(f"spec {spec!r}: {exc}") from None
    torch.manual_seed(seed)
    return getattr(mod, model_name)(config).eval()


def resolve_model(text: str, seed: int = 0, what: str = "model"):
    """(model, description) for a checkpoint folder (leanseq.load) or a spec string."""
    if isinstance(text, (str, os.PathLike)) and Path(text).is_dir():
        from leanseq.models import load

        model = load(text)
        return model.eval(), f"checkpoint {text}"
    text = str(text)
    looks_like_spec = ":" in text or text.strip().lower() in FAMILIES or text.strip().lower() in ALIASES
    if not looks_like_spec:
        raise ModelSpecError(
            f"{what} {text!r} is neither a checkpoint folder (no such directory) nor a spec like "
            f"{DEFAULT_MODEL_A!r} (families: {', '.join(sorted(FAMILIES))})"
        )
    try:
        return build_from_spec(text, seed=seed), text
    except ModelSpecError as exc:
        raise ModelSpecError(f"{what}: {exc}") from None
