"""Mamba-2 language model (Dao & Gu 2024), loading and saving Hugging Face `mamba2` checkpoints.

Parameter names equal transformers' Mamba2ForCausalLM, so a state_dict moves between the two unchanged.
Each mixer projects the input once into (z, xBC, dt); xBC goes through a causal depthwise conv, then the
SSD scan mixes x over time with per-head scalar decays, and z gates the result inside a grouped RMSNorm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanseq.models.config import ConfigBase, ConfigError, check_ssm_numbers
from leanseq.models.layers import GatedRMSNorm, filled_unless_meta
from leanseq.models.ssm import ConvSSMState, SSMLanguageModel
from leanseq.ops import causal_conv1d, causal_conv1d_step
from leanseq.ops.linear import linear
from leanseq.ops.ssd import ssd_chunked, ssd_reference, ssd_step

# Which full-sequence scan the model uses: "chunked" (fast) or "reference" (sequential, for checking).
# Chosen here once; tests may set it. Nothing is probed at import time.
SCAN_IMPL = "chunked"
# Chunk length of the chunked scan. The result does not depend on it, only the speed: config.chunk_size
# (256 in Hub checkpoints) suits GPU kernels, while on CPUs 32-128 runs about twice as fast as 256.
# None uses the config's chunk_size.
SCAN_CHUNK_SIZE: int | None = 64


def _json_float(value):
    """transformers >= 5 writes infinities into config.json as {"__float__": "Infinity"}; read that back."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        special = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
        if value["__float__"] in special:
            return special[value["__float__"]]
    return value


@dataclasses.dataclass
class Mamba2Config(ConfigBase):
    """Keys and defaults of transformers' Mamba2Config (config.json of `mamba2` checkpoints)."""

    model_type: ClassVar[str] = "mamba2"

    num_heads: int = 128
    head_dim: int = 64
    vocab_size: int = 32768
    hidden_size: int = 4096
    state_size: int = 128
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    expand: int = 2
    conv_kernel: int = 4
    n_groups: int = 8
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    rescale_prenorm_residual: bool = False
    chunk_size: int = 256
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if not isinstance(self.time_step_rank, int):
            raise ConfigError(
                f"config key 'time_step_rank' must be an integer or 'auto', got {self.time_step_rank!r}"
            )
        for key in ("vocab_size", "hidden_size", "num_heads", "head_dim", "state_size", "num_hidden_layers",
                    "expand", "conv_kernel", "n_groups", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        check_ssm_numbers(self)
        if self.hidden_size * self.expand != self.num_heads * self.head_dim:
            raise ConfigError(
                f"inconsistent config: hidden_size * expand = {self.hidden_size} * {self.expand} = "
                f"{self.hidden_size * self.expand} must equal num_heads * head_dim = {self.num_heads} * "
                f"{self.head_dim} = {self.num_heads * self.head_dim}"
            )
        if self.num_heads % self.n_groups:
            raise ConfigError(f"config key 'num_heads' ({self.num_heads}) must be a multiple of "
                              f"'n_groups' ({self.n_groups})")
        if self.hidden_act != "silu":
            raise ConfigError(f"config key 'hidden_act': only 'silu' is supported, got {self.hidden_act!r}")
        self.check_special_tokens()
        limit = tuple(_json_float(v) for v in self.time_step_limit)
        numbers = len(limit) == 2 and all(isinstance(v, (int, float)) for v in limit)
        if not numbers or not 0 <= limit[0] <= limit[1]:
            raise ConfigError(f"config key 'time_step_limit' must be [low, high] with 0 <= low <= high, "
                              f"got {self.time_step_limit!r}")
        self.time_step_limit = (float(limit[0]), float(limit[1]))

    # transformers 4.4x wrote these into mamba2 config.json. Its model (like this one) always gates before a
    # grouped RMSNorm whatever they say, so they are read and ignored: those checkpoints load unchanged.
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"norm_before_gate", "rms_norm"})

    @classmethod
    def from_dict(cls, data: dict, strict: bool = True) -> Mamba2Config:
        if data.get("rms_norm", True) is not True:
            raise ConfigError(f"config key 'rms_norm' is {data['rms_norm']!r}; Mamba-2 models here (as in "
                              "transformers) always apply the gated RMSNorm, so only true is supported")
        return super().from_dict(data, strict=strict)

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the conv: x, then B and C for every group."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size


@dataclasses.dataclass
class Mamba2State(ConvSSMState):
    """conv (n_layers, B, conv_dim, conv_kernel - 1); ssm (n_layers, B, num_heads, head_dim, state_size) float32."""


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.n_groups, self.state_size = config.n_groups, config.state_size
        self.d_inner, self.conv_dim = config.intermediate_size, config.conv_dim
        self.chunk_size = config.chunk_size
        self.time_step_limit = config.time_step_limit
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads,
                                 bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(filled_unless_meta(
            torch.empty(self.num_heads), lambda t: torch.log(torch.arange(1, t.numel() + 1, dtype=torch.float32))))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, n_groups=self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.use_bias)

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)

    def _ssm_params(self, xbc: torch.Tensor, dt: torch.Tensor):
        """Conv output (..., conv_dim) and raw dt (..., heads) -> x, B, C (grouped views), positive dt, A."""
        x, B, C = torch.split(xbc, [self.d_inner, self.n_groups * self.state_size,
                                    self.n_groups * self.state_size], dim=-1)
        lead = x.shape[:-1]
        # step size in float32 like the reference kernels, clamped to the config's limit
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
        A = -torch.exp(self.A_log.float())  # (heads,) negative: every head decays
        x = x.reshape(*lead, self.num_heads, self.head_dim)
        B = B.reshape(*lead, self.n_groups, self.state_size)
        C = C.reshape(*lead, self.n_groups, self.state_size)
        return x, B, C, dt, A

    def forward(self, hidden, conv_state, ssm_state):
        """hidden (B, L, H) -> (out (B, L, H), conv_state, ssm_state)."""
        # `linear`: the projections of long inputs through oneDNN when autograd is off (leanseq.ops.linear)
        z, xbc, dt = self._split(linear(hidden, self.in_proj))
        xbc, conv_state = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state)
        x, B, C, dt, A = self._ssm_params(xbc, dt)
        if SCAN_IMPL == "reference":
            y, ssm_state = ssd_reference(x, dt, A, B, C, self.D, initial_state=ssm_state)
        elif SCAN_IMPL != "chunked":
            raise ValueError(f"mamba2.SCAN_IMPL must be 'chunked' or 'reference', got {SCAN_IMPL!r}")
        else:
            chunk = SCAN_CHUNK_SIZE or self.chunk_size
            y, ssm_state = ssd_chunked(x, dt, A, B, C, self.D, initial_state=ssm_state, chunk_size=chunk)
        y = self.norm(y.reshape(*y.shape[:2], self.d_inner), z)
        return linear(y.to(hidden.dtype), self.out_proj), conv_state, ssm_state

    def step(self, hidden, conv_state, ssm_state):
        """hidden (B, H) -> (out (B, H), conv_state, ssm_state)."""
        z, xbc, dt = self._split(self.in_proj(hidden))
        xbc, conv_state = causal_conv1d_step(xbc, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C, dt, A = self._ssm_params(xbc, dt)
        y, ssm_state = ssd_step(ssm_state, x, dt, A, B, C, self.D)
        y = self.norm(y.reshape(y.shape[0], self.d_inner), z)
        return self.out_proj(y.to(hidden.dtype)), conv_state, ssm_state


class Mamba2LM(SSMLanguageModel):
    config_class = Mamba2Config
    state_class = Mamba2State
    hf_architecture = "Mamba2ForCausalLM"
    state_dim_names = (("conv_dim", "conv_kernel - 1"), ("num_heads", "head_dim", "state_size"))

    @staticmethod
    def make_mixer(config: Mamba2Config) -> nn.Module:
        return Mamba2Mixer(config)

    def state_shapes(self):
        cfg = self.config
        return (cfg.conv_dim, cfg.conv_kernel - 1), (cfg.num_heads, cfg.head_dim, cfg.state_size)

    def init_mixer(self, m: Mamba2Mixer) -> None:
        cfg = self.config
        m.conv1d.reset_parameters()
        # S4D-real style decays: head i forgets at rate i, so heads cover several time scales
        m.A_log.copy_(torch.log(torch.arange(1, m.num_heads + 1, dtype=torch.float32)))
        m.D.fill_(1.0)
        # dt log-uniform in [time_step_min, time_step_max]; dt_bias is its inverse softplus
        dt = torch.exp(
            torch.rand(m.num_heads) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
            + math.log(cfg.time_step_min)
        ).clamp(min=cfg.time_step_floor)
        m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        m.norm.weight.fill_(1.0)
