"""Mamba-1 language model (Gu & Dao 2023), loading and saving Hugging Face `mamba` checkpoints.

Parameter names equal transformers' MambaForCausalLM, so a state_dict moves between the two unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanseq.models.config import ConfigBase, ConfigError, check_number, check_ssm_numbers
from leanseq.models.layers import filled_unless_meta
from leanseq.models.ssm import ConvSSMState, SSMLanguageModel
from leanseq.ops import causal_conv1d, causal_conv1d_step
from leanseq.ops.selective_scan import selective_scan_chunked, selective_scan_reference, selective_scan_step

# Which full-sequence scan the model uses: "chunked" (fast) or "reference" (sequential, for checking).
# Chosen here once; tests may set it. Nothing is probed at import time.
SCAN_IMPL = "chunked"
SCAN_CHUNK_SIZE = 64


@dataclasses.dataclass
class MambaConfig(ConfigBase):
    """Keys and defaults of transformers' MambaConfig (config.json of `mamba` checkpoints)."""

    model_type: ClassVar[str] = "mamba"
    key_aliases: ClassVar[dict[str, str]] = {"d_model": "hidden_size", "n_layer": "num_hidden_layers",
                                              "d_inner": "intermediate_size", "d_state": "state_size"}
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"fused_add_norm", "pad_vocab_size_multiple", "ssm_cfg"})

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    initializer_range: float = 0.1
    tie_word_embeddings: bool = True
    intermediate_size: int | None = None
    rms_norm: bool = True  # older checkpoints state it; LayerNorm variants are not supported
    # leanseq's ablation switch: False gives the LTI (S4-like) layer; such checkpoints get model_type
    # "leanseq_mamba_lti", since transformers has no such model. Left out of config.json when True.
    selective: bool = True
    # transformers' MambaConfig defaults these to 0; here None means "not stated" and is left out of config.json
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def to_dict(self):
        out = super().to_dict()
        if self.selective:
            del out["selective"]
        else:
            out["model_type"] = "leanseq_mamba_lti"
        return out

    @classmethod
    def from_dict(cls, data, strict: bool = True):
        data = dict(data)
        if data.get("model_type") == "leanseq_mamba_lti":
            if data.get("selective", False):
                raise ConfigError("model_type 'leanseq_mamba_lti' needs selective=false")
            data.update(model_type="mamba", selective=False)
        return super().from_dict(data, strict=strict)

    def __post_init__(self):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if not isinstance(self.time_step_rank, int):
            raise ConfigError(f"config key 'time_step_rank' must be an integer or 'auto', got {self.time_step_rank!r}")
        expected = int(self.expand * self.hidden_size)
        if self.intermediate_size is None:
            self.intermediate_size = expected
        elif self.intermediate_size != expected:
            raise ConfigError(
                f"config key 'intermediate_size' is {self.intermediate_size} but expand * hidden_size = {expected}"
            )
        if not self.rms_norm:
            raise ConfigError("config key 'rms_norm' is false: only RMSNorm Mamba checkpoints are supported")
        if self.hidden_act != "silu":
            raise ConfigError(f"config key 'hidden_act': only 'silu' is supported, got {self.hidden_act!r}")
        for key in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "conv_kernel", "expand"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        check_ssm_numbers(self)
        check_number("time_step_scale", self.time_step_scale, at_least=0)
        self.check_special_tokens()


def _s4d_real_log(n: int) -> torch.Tensor:
    """log(1..N): the S4D-real decays A = -(1..N) of the Mamba reference init, broadcast over channels."""
    return torch.log(torch.arange(1, n + 1, dtype=torch.float32))


@dataclasses.dataclass
class MambaState(ConvSSMState):
    """conv (n_layers, B, intermediate, conv_kernel - 1); ssm (n_layers, B, intermediate, state_size) float32."""


class MambaMixer(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        d_inner, n, rank = config.intermediate_size, config.state_size, config.time_step_rank
        self.d_inner, self.state_size, self.rank = d_inner, n, rank
        self.in_proj = nn.Linear(config.hidden_size, 2 * d_inner, bias=config.use_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.conv_kernel, groups=d_inner, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(d_inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner, bias=True)
        self.A_log = nn.Parameter(filled_unless_meta(torch.empty(d_inner, n), lambda t: _s4d_real_log(n)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=config.use_bias)

    def decay_rates(self) -> torch.Tensor:
        """A = -exp(A_log), (D, N), float32.

        Recomputed on every call, deliberately: no cache key is reliable (writes through `.data` leave the
        version counter alone, and `p.data = p.data.t()` keeps the address), and comparing A_log with a
        saved copy (torch.equal) costs about as much as the exp. The exp is ~35 us per layer at 130m shape,
        about 3% of that layer's step.
        """
        return -torch.exp(self.A_log.float())

    def _ssm_inputs(self, xs: torch.Tensor):
        """From the conv output to the scan's delta, B, C."""
        dt, B, C = torch.split(self.x_proj(xs), [self.rank, self.state_size, self.state_size], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())  # positive step size, float32 like the reference kernels
        return delta, B, C

    def forward(self, x, conv_state, ssm_state):
        """x (B, L, H) -> (out (B, L, H), conv_state, ssm_state)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, D) each
        xs, conv_state = causal_conv1d(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state)
        delta, B, C = self._ssm_inputs(xs)
        A = self.decay_rates()  # (D, N)
        scan = selective_scan_reference if SCAN_IMPL == "reference" else selective_scan_chunked
        kwargs = {} if SCAN_IMPL == "reference" else {"chunk_size": SCAN_CHUNK_SIZE}
        y, ssm_state = scan(xs, delta, A, B, C, self.D, z, initial_state=ssm_state, **kwargs)
        return self.out_proj(y), conv_state, ssm_state

    def step(self, x, conv_state, ssm_state):
        """x (B, H) -> (out (B, H), conv_state, ssm_state)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, D)
        xs, conv_state = causal_conv1d_step(xs, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        delta, B, C = self._ssm_inputs(xs)
        A = self.decay_rates()
        y, ssm_state = selective_scan_step(ssm_state, xs, delta, A, B, C, self.D, z)
        return self.out_proj(y), conv_state, ssm_state


class LTIMixer(MambaMixer):
    """The S4-like ablation of the Mamba paper (section 4.1, Table 1): dt, B and C are learned parameters,
    the same at every position, so the layer is linear time-invariant and cannot select what to remember."""

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        del self.x_proj
        self.dt_lti = nn.Parameter(torch.zeros(self.rank))  # (R,): input to dt_proj, shared by all positions
        n = self.state_size
        self.B_lti = nn.Parameter(filled_unless_meta(torch.empty(n), lambda t: torch.randn(n) / math.sqrt(n)))  # (N,)
        self.C_lti = nn.Parameter(filled_unless_meta(torch.empty(n), lambda t: torch.randn(n) / math.sqrt(n)))  # (N,)

    def _ssm_inputs(self, xs: torch.Tensor):
        delta = F.softplus(self.dt_proj(self.dt_lti).float()).expand_as(xs)  # (..., D), no dependence on xs
        shape = (*xs.shape[:-1], self.state_size)
        return delta, self.B_lti.expand(shape), self.C_lti.expand(shape)


class MambaLM(SSMLanguageModel):
    config_class = MambaConfig
    state_class = MambaState
    hf_architecture = "MambaForCausalLM"
    state_dim_names = (("intermediate_size", "conv_kernel - 1"), ("intermediate_size", "state_size"))

    @staticmethod
    def make_mixer(config: MambaConfig) -> nn.Module:
        return MambaMixer(config) if config.selective else LTIMixer(config)

    def state_shapes(self):
        cfg = self.config
        return (cfg.intermediate_size, cfg.conv_kernel - 1), (cfg.intermediate_size, cfg.state_size)

    def init_mixer(self, m: MambaMixer) -> None:
        cfg = self.config
        dt_std = cfg.time_step_rank**-0.5 * cfg.time_step_scale
        nn.init.uniform_(m.dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(
            torch.rand(m.d_inner) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
            + math.log(cfg.time_step_min)
        ).clamp(min=cfg.time_step_floor)
        m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        m.A_log.copy_(_s4d_real_log(m.state_size).expand_as(m.A_log))
        m.D.fill_(1.0)
