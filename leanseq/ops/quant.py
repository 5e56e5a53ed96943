"""Int8 weight-only quantisation for decode and prefill.

`quantize_int8(model)` replaces the large Linear layers (Mamba: every mixer's in_proj and out_proj, x_proj too
with `include_small=True`; the transformer: every q/k/v/o and gate/up/down projection; and the LM head) by
`Int8Linear`: int8 weights (out, in) with one float32 scale per
output row (symmetric, scale = max|w| / 127). Everything else stays float32: embeddings, norms, the conv,
A_log, D, dt_proj / dt_bias, and the recurrent state or KV cache. The model keeps the whole contract (forward, step,
generate, Session, SessionPool):

- decode: the native step (leanseq.ops.decode, decode_transformer) reads one byte per weight and widens it
  in registers;
- prefill: the layer's weights are dequantised to float32 and multiplied as one matrix product; a few rows
  (the eager step) go through the native kernel's int8 matrix-vector product when it is built.
  torch's fused int8-weight matmul (`torch._weight_int8pack_mm`) was measured and not used: on this CPU it
  costs about 1 ms per row of a 768 -> 3072 layer (518 ms for 512 rows, where dequantising and one float32
  matmul take 21 ms).

A tied LM head (tie_word_embeddings) is quantised as its own copy: the embedding lookup stays float32.
Quantised models cannot be saved with save_pretrained (the checkpoint formats hold float weights).
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


def _refuse_save(*args, **kwargs):
    raise NotImplementedError("this model holds int8 weights; save the float32 model before quantize_int8")


@torch.no_grad()
def quantize_int8(model: nn.Module, include_small: bool = False) -> nn.Module:
    """Quantise `model` (a float32 Mamba-1, Mamba-2 or transformer language model) in place and return it."""
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
        model.lm_head = Int8Linear.from_float(head.weight, head.bias)
    model.quantization = "int8"
    model.save_pretrained = _refuse_save  # the checkpoint formats hold float weights only
    if hasattr(model, "invalidate_native"):
        model.invalidate_native()
    return model
