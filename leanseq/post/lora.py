"""LoRA adapters on leanseq models through peft's generic path (any nn.Module with `target_modules`).

    model = leanseq.load("ckpt")
    peft_model = add_lora(model, LoraSettings(r=8, targets=("in_proj", "x_proj", "dt_proj", "out_proj")))
    ... train peft_model (only the adapters require grad) ...
    save_adapter(peft_model, "adapter/")              # peft's format + leanseq_adapter.json (the base's identity)
    peft_model = load_adapter(leanseq.load("ckpt"), "adapter/")   # refuses an adapter made for another base
    merged = merge_adapter(peft_model)                 # a plain leanseq model: save_pretrained, leanseq.load

Which modules take an adapter (TARGETS, tested in tests/post/test_lora.py): every nn.Linear the mixers and
attention blocks call as a module, and the embeddings. A module leanseq reads the weight of directly (Mamba's
conv1d: the conv kernel takes `conv1d.weight`) would ignore its adapter, so it is refused. peft itself refuses
out_proj and conv1d on model_type mamba/mamba2 because transformers' fused CUDA kernels bypass those modules;
leanseq has no such kernel (its native decode step steps aside while an adapter is on: it reads only plain
nn.Linear / nn.Embedding modules), so while peft injects adapters it is shown leanseq's own family name.
With the LM head tied to the embeddings, an adapter on either would change the other once merged; such targets
are refused on tied models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

ADAPTER_IDENTITY_FILE = "leanseq_adapter.json"

# family (config.model_type) -> module names (the last part of the dotted name) an adapter may target
TARGETS = {
    "mamba": ("in_proj", "x_proj", "dt_proj", "out_proj", "embeddings", "lm_head"),
    "mamba2": ("in_proj", "out_proj", "embeddings", "lm_head"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
              "lm_head"),
}
TARGETS["leanseq_mamba_lti"] = tuple(t for t in TARGETS["mamba"] if t != "x_proj")
TARGETS["leanseq_transformer"] = TARGETS["llama"]
DEFAULT_TARGETS = {"mamba": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj"),
                   "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
DEFAULT_TARGETS["leanseq_mamba_lti"] = ("in_proj", "dt_proj", "out_proj")
DEFAULT_TARGETS["leanseq_transformer"] = DEFAULT_TARGETS["llama"]
_TIED = ("embeddings", "embed_tokens", "lm_head")


class AdapterError(ValueError):
    """An adapter that does not fit the model it is put on, or a target leanseq cannot honour."""


@dataclasses.dataclass
class LoraSettings:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: DEFAULT_TARGETS of the model's family

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise AdapterError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in TARGETS:
        raise AdapterError(f"LoRA supports leanseq Mamba, Mamba-2 and transformer models, got "
                           f"{type(model).__name__} (model_type {model_type!r})")
    return model_type


def check_targets(model, targets) -> tuple[str, ...]:
    """The targets to use on `model` (its family's defaults when None), each checked to be one leanseq honours."""
    model_type = _model_type(model)
    if targets is None:
        return DEFAULT_TARGETS[model_type]
    targets = tuple(targets)
    if not targets:
        raise AdapterError("no LoRA targets given; choose from: " + ", ".join(TARGETS[model_type]))
    allowed = TARGETS[model_type]
    for t in targets:
        if t not in allowed:
            why = " (leanseq's conv kernel reads conv1d.weight directly, so an adapter there would be ignored)" \
                if t == "conv1d" else ""
            raise AdapterError(f"LoRA target {t!r} is not supported on {model_type}{why}; choose from: "
                               f"{', '.join(allowed)}")
        if t in _TIED and getattr(model.config, "tie_word_embeddings", False):
            raise AdapterError(f"LoRA target {t!r}: this model's LM head is tied to its embeddings "
                               "(tie_word_embeddings), so a merged adapter on one would change the other; "
                               "leave it out on tied models")
    return targets


@contextlib.contextmanager
def _peft_sees_leanseq(model):
    """peft refuses out_proj and conv1d on model_type mamba/mamba2 (fused CUDA kernels in transformers bypass
    them). leanseq calls out_proj as a module (tested) and check_targets refuses conv1d itself, so while peft
    builds or loads adapters the config shows a leanseq-specific model_type."""
    config = model.config
    own = "model_type" in vars(config)
    saved = vars(config).get("model_type")
    config.model_type = "leanseq_" + str(saved if own else type(config).model_type)
    try:
        yield
    finally:
        if own:
            config.model_type = saved
        else:
            del config.model_type


def _lora_config(settings: LoraSettings, targets):
    from peft import LoraConfig

    # regex on the dotted name's last part: "in_proj" must not match "backbone.layers.0.mixer.in_proj_x"
    pattern = r".*\.(" + "|".join(targets) + r")$|^(" + "|".join(targets) + r")$"
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=pattern, bias="none")


def add_lora(model, settings: LoraSettings | None = None, init_lora_weights: bool = True):
    """Wrap a float leanseq model in a peft model with fresh LoRA adapters; only the adapters require grad.

    The returned PeftModel keeps the model contract (forward, step, init_state, generate, Session) through
    peft's attribute forwarding. init_lora_weights=False gives non-zero adapters (for tests)."""
    from peft import get_peft_model

    settings = settings or LoraSettings()
    _refuse_quantized(model)
    targets = check_targets(model, settings.targets)
    config = _lora_config(settings, targets)
    config.init_lora_weights = init_lora_weights
    identity = base_identity(model)  # before injection: adapters rename the wrapped weights
    with _peft_sees_leanseq(model):
        peft_model = get_peft_model(model, config)
    peft_model.leanseq_targets = targets
    peft_model.leanseq_base_identity = identity
    return peft_model


def _refuse_quantized(model) -> None:
    if getattr(model, "quantization", None) is not None:
        raise AdapterError("LoRA needs the float32 model: this one is quantised (int8); fine-tune the float "
                           "model, merge the adapter, then quantise (`leanseq quantize`)")


def base_identity(model) -> dict:
    """What an adapter records about its base model: family, config and a sha256 over its weights."""
    from leanseq.stream.blob import weights_hash

    return {"model_type": model.config.model_type, "config": model.config.to_dict(),
            "weights_sha256": weights_hash(model)}


def save_adapter(peft_model, path: str | os.PathLike) -> Path:
    """Write the adapters in peft's format (adapter_config.json + adapter_model.safetensors) and the base
    model's identity (leanseq_adapter.json), so loading them onto another base is refused."""
    from leanseq.models.checkpoint import atomic_write_dir

    identity = getattr(peft_model, "leanseq_base_identity", None)
    if identity is None:
        raise AdapterError("this peft model was not made by leanseq.post.lora (add_lora / load_adapter), so its "
                           "base model's identity is unknown")
    identity = {**identity, "targets": list(getattr(peft_model, "leanseq_targets", ()))}

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)  # adapters only, never the base
        (tmp / ADAPTER_IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")

    return atomic_write_dir(path, write)


def check_adapter_base(model, path: str | os.PathLike, allow_other_weights: bool = False) -> dict:
    """Refuse an adapter folder whose recorded base differs from `model`; returns the recorded identity."""
    from leanseq.models.checkpoint import _read_json

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path} is not a LoRA adapter folder (no adapter_config.json); adapters are written "
                           "by `leanseq finetune` or leanseq.post.lora.save_adapter")
    if not (path / ADAPTER_IDENTITY_FILE).is_file():
        raise AdapterError(f"{path} has no {ADAPTER_IDENTITY_FILE}, so the base model it was trained on is "
                           "unknown; leanseq loads adapters written by `leanseq finetune` (save_adapter)")
    identity = _read_json(path / ADAPTER_IDENTITY_FILE, "it must be a regular JSON file")
    if not isinstance(identity, dict) or not isinstance(identity.get("config"), dict):
        raise AdapterError(f"{path / ADAPTER_IDENTITY_FILE} is not a leanseq adapter record")
    mine = json.loads(json.dumps(model.config.to_dict()))  # as the record holds it (tuples become lists)
    theirs = identity["config"]
    if identity.get("model_type") != model.config.model_type or theirs != mine:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        shown = ", ".join(f"{k}: adapter's base {theirs.get(k)!r}, this model {mine.get(k)!r}" for k in diff[:4])
        raise AdapterError(f"{path} is an adapter for another base model ({shown}); load it onto the model it "
                           "was trained on")
    if not allow_other_weights:
        from leanseq.stream.blob import weights_hash

        if identity.get("weights_sha256") != weights_hash(model):
            raise AdapterError(f"{path} was trained on a base model with the same shape but other weights "
                               f"(sha256 {str(identity.get('weights_sha256'))[:12]}..., this model "
                               f"{weights_hash(model)[:12]}...); load it onto that base, or pass "
                               "allow_other_weights=True (--allow-other-base) to apply it anyway")
    return identity


def load_adapter(model, path: str | os.PathLike, allow_other_weights: bool = False, trainable: bool = False):
    """Put the adapters saved at `path` on `model` (a float leanseq model); refuses an adapter for another base."""
    from peft import PeftModel

    _refuse_quantized(model)
    identity = check_adapter_base(model, path, allow_other_weights)
    targets = check_targets(model, identity.get("targets") or None)
    with _peft_sees_leanseq(model):
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    peft_model.leanseq_targets = targets
    peft_model.leanseq_base_identity = {k: v for k, v in identity.items() if k != "targets"}
    return peft_model


def merge_adapter(peft_model) -> nn.Module:
    """The base model with the adapters merged into its weights: a plain leanseq model again (save_pretrained,
    leanseq.load, the native decode step)."""
    with torch.no_grad():
        model = peft_model.merge_and_unload()
    if hasattr(model, "invalidate_native"):
        model.invalidate_native()
    return model


def finetune(model, task, settings: LoraSettings, train, out_dir: str | os.PathLike, merge: bool = False,
             progress: bool = True, tokenizer=None) -> dict:
    """Train LoRA adapters on `model` for `task` with leanseq's Trainer; write out_dir/adapter (and, with merge,
    out_dir/merged, a plain checkpoint). Returns held-out loss and accuracy before and after, and the sizes."""
    from leanseq.train import OutputSection, Trainer

    out_dir = Path(out_dir)
    peft_model = add_lora(model, settings)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    trainer = Trainer(peft_model, task, train, OutputSection(dir=str(out_dir / "run"), resume=False,
                                                             save_model=False, progress=progress))
    before = trainer.evaluate()
    after = trainer.fit()
    save_adapter(peft_model, out_dir / "adapter")
    report = {"before": before, "after": {k: v for k, v in after.items() if k.startswith("eval_")},
              "steps": after["step"], "trainable_parameters": trainable, "parameters": total - trainable,
              "targets": list(peft_model.leanseq_targets), "adapter": str(out_dir / "adapter")}
    if merge:
        merged = merge_adapter(peft_model)
        merged.save_pretrained(out_dir / "merged", tokenizer=tokenizer)
        report["merged"] = str(out_dir / "merged")
    return report
