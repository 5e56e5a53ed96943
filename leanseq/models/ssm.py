"""The skeleton Mamba-1 and Mamba-2 share: embeddings, residual blocks around a mixer, final norm, LM head,
and a state made of one rolling conv window and one SSM state per layer. Each family supplies its mixer
(`forward(x, conv, ssm)` over a sequence and `step(x, conv, ssm)` for one token) and its state shapes.
Module names follow Hugging Face (backbone.embeddings, backbone.layers.{i}.norm / .mixer, backbone.norm_f,
lm_head), so checkpoints move between leanseq and transformers unchanged.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from leanseq.models.base import LanguageModel
from leanseq.models.layers import RMSNorm, embedding
from leanseq.models.state import State, TensorSpec
from leanseq.ops import decode


@dataclasses.dataclass
class ConvSSMState(State):
    conv: torch.Tensor  # (n_layers, B, conv channels, conv_kernel - 1), model dtype
    ssm: torch.Tensor  # (n_layers, B, *family's SSM state shape), float32


class ResidualBlock(nn.Module):
    """x + mixer(norm(x)), with the residual kept in float32 when the checkpoint asks for it."""

    def __init__(self, config, mixer: nn.Module):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = mixer

    def forward(self, x, conv_state, ssm_state, step: bool = False):
        residual = x.float() if self.residual_in_fp32 else x
        mix = self.mixer.step if step else self.mixer
        out, conv_state, ssm_state = mix(self.norm(x.to(self.norm.weight.dtype)), conv_state, ssm_state)
        return residual + out, conv_state, ssm_state


class SSMBackbone(nn.Module):
    def __init__(self, config, make_mixer):
        super().__init__()
        self.embeddings = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ResidualBlock(config, make_mixer(config)) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class SSMLanguageModel(LanguageModel):
    """Subclasses set config_class, state_class, hf_architecture and implement `make_mixer`, `state_shapes`
    and `init_mixer` (the family's own parameter initialisation)."""

    def __init__(self, config):
        super().__init__(config)
        self.backbone = SSMBackbone(config, self.make_mixer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @staticmethod
    @abc.abstractmethod
    def make_mixer(config) -> nn.Module:
        """The family's mixer for one layer."""

    @abc.abstractmethod
    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-row shapes of one layer's (conv state, SSM state)."""

    # names of the per-row dimensions of (conv state, SSM state), for error messages; None: dim2, dim3, ...
    state_dim_names: ClassVar[tuple[tuple[str, ...], tuple[str, ...]] | None] = None

    @abc.abstractmethod
    def init_mixer(self, mixer: nn.Module) -> None:
        """The family's own initialisation of a mixer's SSM parameters."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation for training from scratch, following the Mamba reference recipe."""
        if self.lm_head.weight.is_meta:  # built to be loaded: the checkpoint's tensors replace everything
            return
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.backbone.layers:
            mixer = block.mixer
            for lin in (mixer.in_proj, getattr(mixer, "x_proj", None), mixer.out_proj):
                if lin is None:  # the LTI ablation has no x_proj
                    continue
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            # out_proj scaled down with depth so the residual stream stays O(1) (GPT-2 / Mamba recipe)
            mixer.out_proj.weight.div_(math.sqrt(2 * self.config.num_hidden_layers))
            self.init_mixer(mixer)
            block.norm.weight.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)

    def init_state(self, batch_size: int, device=None) -> ConvSSMState:
        device = device if device is not None else self.device
        n_layers = self.config.num_hidden_layers
        conv_shape, ssm_shape = self.state_shapes()
        return self.state_class(
            position=torch.zeros(batch_size, dtype=torch.long, device=device),
            conv=torch.zeros(n_layers, batch_size, *conv_shape, dtype=self.dtype, device=device),
            ssm=torch.zeros(n_layers, batch_size, *ssm_shape, dtype=torch.float32, device=device),
        )

    def _embedding_weight(self) -> torch.Tensor:
        """backbone.embeddings.weight, read from the modules' own dicts: what the attribute route reads, without
        three nn.Module.__getattr__ calls (~2 us, and every step reads dtype and device)."""
        try:
            return self._modules["backbone"]._modules["embeddings"]._parameters["weight"]
        except (KeyError, AttributeError):  # a wrapped or hand-edited model: the attribute route says what is wrong
            embeddings = self.backbone.embeddings
            # int8 embeddings (leanseq.ops.quant) compute in float32 on their scales' device
            scale = getattr(embeddings, "scale", None) if getattr(embeddings, "qweight", None) is not None else None
            return scale if scale is not None else embeddings.weight

    def _placement(self) -> tuple[torch.dtype, torch.device]:
        w = self._embedding_weight()  # (dtype, device) in one read, for the states' vouch marks
        return w.dtype, w.device

    @property
    def device(self) -> torch.device:
        return self._embedding_weight().device  # direct: a parameters() walk costs more than a state check

    @property
    def dtype(self) -> torch.dtype:
        return self._embedding_weight().dtype  # not lm_head: quantize_int8 may make it an Int8Linear

    def state_spec(self, batch_size: int) -> dict[str, TensorSpec]:
        n_layers = self.config.num_hidden_layers
        conv_shape, ssm_shape = self.state_shapes()
        conv_dims, ssm_dims = self.state_dim_names or (
            tuple(f"dim{i + 2}" for i in range(len(conv_shape))), tuple(f"dim{i + 2}" for i in range(len(ssm_shape))))
        return {
            "position": self._position_spec(batch_size),
            "conv": TensorSpec((n_layers, batch_size, *conv_shape), ("n_layers", "batch", *conv_dims),
                               self.dtype),  # as init_state makes it
            "ssm": TensorSpec((n_layers, batch_size, *ssm_shape), ("n_layers", "batch", *ssm_dims), torch.float32),
        }

    def _run(self, hidden, state: ConvSSMState | None, step: bool, last: int | None = None):
        hidden, new_state = self._hidden(hidden, state, step, last)
        head_dtype = getattr(self.lm_head, "compute_dtype", None)  # int8 heads compute in float32
        if head_dtype is None:
            weight = self.lm_head.weight  # torch.ao's dynamically quantized Linear makes `weight` a method
            head_dtype = weight.dtype if isinstance(weight, torch.Tensor) else hidden.dtype
        return self.lm_head(hidden.to(head_dtype)), new_state

    def _hidden(self, hidden, state: ConvSSMState | None, step: bool = False, last: int | None = None):
        convs, ssms = [], []
        for i, block in enumerate(self.backbone.layers):
            conv = state.conv[i] if state is not None else None
            ssm = state.ssm[i] if state is not None else None
            hidden, conv, ssm = block(hidden, conv, ssm, step=step)
            convs.append(conv)
            ssms.append(ssm)
        length = 1 if step else hidden.shape[1]
        if last is not None:  # logits for the last positions only: norm and LM head skip the others
            hidden = hidden[:, -last:]
        hidden = self.backbone.norm_f(hidden.to(self.backbone.norm_f.weight.dtype))
        if state is None:
            return hidden, None
        new_state = self.state_class(
            position=state.position + length,
            conv=torch.stack(convs).to(state.conv.dtype),
            ssm=torch.stack(ssms).float(),
        )
        return hidden, new_state

    def _forward(self, input_ids, state):
        return self._run(self.backbone.embeddings(input_ids), state, step=False)

    def _forward_last(self, input_ids, state, n):
        return self._run(self.backbone.embeddings(input_ids), state, step=False, last=n)

    def _native_step(self, token_ids, state):
        return decode.try_step(self, token_ids, state)  # the C entry checks the ids' range before any read

    def _step(self, token_ids, state):
        # the compiled whole-step kernel when it applies (leanseq.ops.decode says when); else the eager layers
        out = decode.try_step(self, token_ids, state)
        if out is not None:
            return out
        return self._run(self.backbone.embeddings(token_ids), state, step=True)

    def invalidate_native(self) -> None:
        """Drop the native decode plan; the next step rebuilds it. Rarely needed: the plan reads weights in
        place and notices replaced modules or tensors by itself (see leanseq.ops.decode)."""
        decode.invalidate(self)
