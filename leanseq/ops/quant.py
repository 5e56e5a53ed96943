"""Int8 weight-only quantisation for decode and prefill.

`quantize_int8(model)` replaces the large Linear layers (Mamba: every mixer's in_proj and out_proj, x_proj too
with `include_small=True`; the transformer: every q/k/v/o and gate/up/down projection; and the LM head) by
`Int8Linear`: int8 weights (out, in) with one float32 scale per
output row (symmetric, scale = max|w| / 127). Everything else stays float32: embeddings (unless tied to the
head, below), norms, the conv,
A_log, D, dt_proj / dt_bias, and the recurrent state or KV cache. The model keeps the whole contract (forward, step,
generate, Session, SessionPool):

- decode: the native step (leanseq.ops.decode, decode_transformer) reads one byte per weight and widens it
  in registers;
- prefill: the layer's weights are dequantised to float32 and multiplied as one matrix product; a few rows
  (the eager step) go through the native kernel's int8 matrix-vector product when it is built.
  torch's fused int8-weight matmul (`torch._weight_int8pack_mm`) was measured and not used: on this CPU it
  costs about 1 ms per row of a 768 -> 3072 layer (518 ms for 512 rows, where dequantising and one float32
  matmul take 21 ms).

A tied LM head (tie_word_embeddings) of a Mamba model is quantised once and the embedding lookup reads the
same int8 rows (`Int8Embedding`; embeddings=False keeps a float32 embedding beside an int8 copy of the head).

Saving: `save_pretrained` writes the int8 tensors (`<layer>.qweight`, `<layer>.scale`) and a
`quantization_config` record in config.json naming every quantised module; `leanseq.load` reads that record,
rebuilds the same modules and loads the int8 tensors (float32 only: a dtype= conversion is refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanseq.ops import decode

_GEMV_ROWS = 4  # up to this many rows the int8 matrix-vector kernel beats dequantising the whole layer


class Int8Linear(nn.Module):
    """y = (x @ qweight.T) * scale + bias, with qweight int8 (out, in) and scale float32 (out,)."""

    compute_dtype = torch.float32

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        if scale.shape != (qweight.shape[0],):
            raise ValueError(f"scale must be ({qweight.shape[0]},), got {tuple(scale.shape)}")
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        w = weight.detach().float()
        # per output row, symmetric: the largest |w| of a row maps to 127; an all-zero row keeps scale 1
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scale, bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= _GEMV_ROWS and x2.device.type == "cpu" and x2.dtype == torch.float32 \
                and not torch.is_grad_enabled() and decode.enabled() and decode.library() is not None:
            y = decode.gemv(self.qweight, x2, self.scale, threads=torch.get_num_threads())
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2.float(), self.dequantize(), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int8Embedding(nn.Module):
    """An embedding lookup over int8 rows with one float32 scale per row: row i = qweight[i] * scale[i]."""

    compute_dtype = torch.float32

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"Int8Embedding needs int8 (vocab, dim) rows and (vocab,) scales, got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scale.shape)}")
        self.num_embeddings, self.embedding_dim = qweight.shape
        # no copies: these may be the very buffers of the int8 LM head they are tied to
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        lin = Int8Linear.from_float(weight)
        return cls(lin.qweight, lin.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales"


QUANT_METHOD = "leanseq_int8"
QUANTIZED_MODEL_TYPE = "leanseq_int8"  # config.json's model_type; the family is quantization_config.model_type
QUANT_FORMAT_VERSION = 1
# what every leanseq_int8 checkpoint keeps in float32, stated in its record for whoever reads config.json
FLOAT32_PARTS = ["A_log", "D", "dt_proj / dt_bias", "conv1d", "norms", "recurrent state"]


@torch.no_grad()
def quantize_int8(model: nn.Module, include_small: bool = False, embeddings: bool = True) -> nn.Module:
    """Quantise `model` (a float32 Mamba-1, Mamba-2 or transformer language model) in place and return it.

    include_small: Mamba's x_proj too. embeddings: a Mamba model whose LM head is tied to its embeddings reads
    its embedding rows from the int8 head (one int8 copy instead of a float32 embedding plus an int8 head).
    """
    if getattr(model, "quantization", None) is not None:
        raise ValueError("this model is already quantised (int8); quantise the float32 model once")
    if hasattr(model, "backbone") and hasattr(model, "lm_head"):  # Mamba-1 / Mamba-2
        names = ["in_proj", "out_proj"] + (["x_proj"] if include_small else [])
        targets = [(block.mixer, names) for block in model.backbone.layers]
    elif hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head"):  # TransformerLM
        targets = [t for block in model.model.layers for t in (
            (block.self_attn, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            (block.mlp, ["gate_proj", "up_proj", "down_proj"]))]
    else:
        raise TypeError(f"quantize_int8 supports leanseq Mamba / Mamba-2 / transformer models, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise TypeError(f"quantize_int8 wants a float32 model; {name} is {p.dtype}")
    for module, names in targets:
        for n in names:
            lin = getattr(module, n, None)
            if isinstance(lin, nn.Linear):
                setattr(module, n, Int8Linear.from_float(lin.weight, lin.bias))
    head = model.lm_head
    if isinstance(head, nn.Linear):
        tied = hasattr(model, "backbone") and head.weight is getattr(model.backbone.embeddings, "weight", None)
        model.lm_head = Int8Linear.from_float(head.weight, head.bias)
        if tied and embeddings and head.bias is None:
            model.backbone.embeddings = Int8Embedding(model.lm_head.qweight, model.lm_head.scale)
    model.quantization = "int8"
    if hasattr(model, "invalidate_native"):
        model.invalidate_native()
    return model


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """{module name: "linear" | "embedding"} of every int8 module of `model`."""
    kinds = {Int8Linear: "linear", Int8Embedding: "embedding"}
    return {name: kinds[type(m)] for name, m in model.named_modules() if type(m) in kinds}


def quantization_config(model: nn.Module) -> dict:
    """The record config.json keeps for a quantised model: method, format version and every int8 module."""
    return {"quant_method": QUANT_METHOD, "format_version": QUANT_FORMAT_VERSION, "bits": 8,
            "weights": "symmetric per output row, float32 scales", "float32": FLOAT32_PARTS,
            "modules": quantized_modules(model)}


def shared_keys(model: nn.Module) -> tuple[str, ...]:
    """state_dict names that alias a tensor already named earlier (an int8 head tied to int8 embeddings): a
    checkpoint stores the tensor once, under its first name."""
    seen, dup = set(), []
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) in seen:
            dup.append(name)
        seen.add(id(t))
    return tuple(dup)


def apply_quantization_config(model: nn.Module, record, where: str) -> nn.Module:
    """Turn a freshly built float model (meta tensors will do) into the int8 layout `record` describes, so its
    state_dict takes the checkpoint's tensors. Raises ValueError naming what in the record is wrong."""
    if not isinstance(record, dict) or record.get("quant_method") != QUANT_METHOD:
        method = record.get("quant_method") if isinstance(record, dict) else record
        raise ValueError(f"{where}: quantization_config has quant_method {method!r}; leanseq loads only "
                         f"{QUANT_METHOD!r} checkpoints (written by `leanseq quantize` or save_pretrained)")
    if record.get("format_version") != QUANT_FORMAT_VERSION:
        raise ValueError(f"{where}: quantization_config format_version {record.get('format_version')!r} is not "
                         f"{QUANT_FORMAT_VERSION}; this leanseq cannot read it (upgrade leanseq)")
    modules = record.get("modules")
    if not isinstance(modules, dict) or not modules or not all(
            isinstance(k, str) and v in ("linear", "embedding") for k, v in modules.items()):
        raise ValueError(f"{where}: quantization_config.modules must map module names to 'linear' or "
                         f"'embedding', got {modules!r}")
    owned = dict(model.named_modules())
    for name, kind in modules.items():
        module = owned.get(name)
        expected = nn.Linear if kind == "linear" else nn.Embedding
        if not isinstance(module, expected) or not name:
            raise ValueError(f"{where}: quantization_config names {name!r} as an int8 {kind}, but this model has "
                             f"no {expected.__name__} of that name")
    with torch.no_grad():
        for name, kind in modules.items():
            owner, _, attr = name.rpartition(".")
            parent = model.get_submodule(owner) if owner else model
            module = getattr(parent, attr)
            if kind == "linear":
                out, inp = module.weight.shape
                bias = None if module.bias is None else torch.empty_like(module.bias)
                new = Int8Linear(torch.empty(out, inp, dtype=torch.int8, device=module.weight.device),
                                 torch.empty(out, device=module.weight.device), bias)
            else:
                rows, dim = module.weight.shape
                new = Int8Embedding(torch.empty(rows, dim, dtype=torch.int8, device=module.weight.device),
                                    torch.empty(rows, device=module.weight.device))
            setattr(parent, attr, new)
        # tied int8 embeddings read the head's own buffers, as quantize_int8 left them
        emb = getattr(getattr(model, "backbone", None), "embeddings", None)
        head = getattr(model, "lm_head", None)
        if isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear) \
                and getattr(model.config, "tie_word_embeddings", False):
            emb.qweight, emb.scale = head.qweight, head.scale
    model.quantization = "int8"
    return model


def check_int8_tensors(model: nn.Module, where: str) -> None:
    """Refuse a loaded int8 model whose tensors are not what the int8 modules compute with."""
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int8Embedding)):
            if m.qweight.dtype != torch.int8 or m.scale.dtype != torch.float32:
                raise ValueError(f"{where}: {name}.qweight must be int8 and {name}.scale float32, found "
                                 f"{m.qweight.dtype} and {m.scale.dtype}")
            if not torch.isfinite(m.scale).all() or bool((m.scale <= 0).any()):
                raise ValueError(f"{where}: {name}.scale holds values that are not finite and positive")
