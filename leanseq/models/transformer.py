"""A Llama-style causal transformer: the fair baseline for the recurrent models.

    RMSNorm -> grouped-query attention with RoPE (through scaled_dot_product_attention) -> residual
    RMSNorm -> SwiGLU MLP -> residual, repeated; final RMSNorm; lm_head (optionally tied to the embedding).

Parameter names and config keys are Hugging Face Llama's, so a `position_embedding="rope"` model saves a real
Llama checkpoint (model_type "llama") that `transformers.LlamaForCausalLM` loads with the same logits, and
Llama checkpoints load here. The `position_embedding="absolute"` variant (model_type "leanseq_transformer")
replaces RoPE with learned absolute position embeddings, bounded by max_position_embeddings.

The state is a KV cache (see TransformerState). Its rows may sit at different positions, so a pool of
independent streams can be stepped as one batch: every row writes its new keys at its own position and
attends only to its own valid prefix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanseq.models.base import LanguageModel
from leanseq.models.config import ConfigBase, ConfigError, check_number
from leanseq.models.layers import RMSNorm, embedding
from leanseq.models.state import State, TensorSpec
from leanseq.ops import decode_transformer

ROPE_MODEL_TYPE = "llama"
ABSOLUTE_MODEL_TYPE = "leanseq_transformer"
DEFAULT_ROPE_THETA = 10_000.0

# hidden_act names as transformers' ACT2FN spells them -> the same function in torch
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# torch >= 2.5 lets SDPA share each key/value head among a group of query heads without copying them
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# queries x slots per attention call on a cache that is not empty: the mask (and, on the math path, the
# scores) of one call hold this many elements, so a long chunk continuing a state is attended to in pieces
# and its memory grows linearly with the context, not with its square
_CACHED_ATTENTION_BUDGET = 1 << 20


# ---- config -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TransformerConfig(ConfigBase):
    """Hugging Face LlamaConfig's keys and defaults, plus leanseq's `position_embedding`."""

    model_type: ClassVar[str] = ROPE_MODEL_TYPE  # per instance: "leanseq_transformer" for the absolute variant

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None  # None -> {"rope_type": "default", "rope_theta": 10000.0}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    position_embedding: str = "rope"  # leanseq: "rope" | "absolute" (learned, up to max_position_embeddings)
    bos_token_id: int | None = None  # None: not stated, left out of config.json
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be a positive integer, got {getattr(self, name)}")
        check_number("rms_norm_eps", self.rms_norm_eps, above=0)
        if self.position_embedding not in ("rope", "absolute"):
            raise ConfigError(f"position_embedding must be 'rope' or 'absolute', got {self.position_embedding!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 1 or (self.position_embedding == "rope" and self.head_dim % 2):
            raise ConfigError(f"head_dim must be a positive (and, with RoPE, even) integer, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        self.rope_parameters = _standard_rope_parameters(self.rope_parameters)
        self.check_special_tokens()
        self.model_type = ROPE_MODEL_TYPE if self.position_embedding == "rope" else ABSOLUTE_MODEL_TYPE

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> TransformerConfig:
        data = dict(data)
        model_type = data.pop("model_type", None)  # absent: position_embedding (default "rope") decides
        implied = {ROPE_MODEL_TYPE: "rope", ABSOLUTE_MODEL_TYPE: "absolute"}
        if model_type is not None and model_type not in implied:
            raise ConfigError(
                f"config has model_type {model_type!r}, but {cls.__name__} expects "
                f"{ROPE_MODEL_TYPE!r} or {ABSOLUTE_MODEL_TYPE!r}"
            )
        position_embedding = data.setdefault("position_embedding", implied.get(model_type, "rope"))
        if model_type is not None and position_embedding != implied[model_type]:
            raise ConfigError(
                f"model_type {model_type!r} means position_embedding={implied[model_type]!r}, "
                f"but the config says {position_embedding!r}"
            )
        if data.get("mlp_bias"):
            raise ConfigError("config key 'mlp_bias': true is not supported (leanseq's MLP has no biases)")
        # older transformers wrote rope_theta / rope_scaling at the top level; fold them in as transformers does
        legacy_scaling = data.pop("rope_scaling", None)
        legacy_theta = data.pop("rope_theta", None)
        rope = legacy_scaling or data.get("rope_parameters")  # transformers' priority: rope_scaling wins
        if rope is not None or legacy_theta is not None:
            if rope is not None and not isinstance(rope, dict):
                raise ConfigError(f"config key 'rope_parameters' must be a mapping, got {rope!r}")
            rope = dict(rope or {})
            if legacy_theta is not None:
                rope.setdefault("rope_theta", legacy_theta)
            data["rope_parameters"] = rope
        return super().from_dict(data, strict=strict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rope_parameters"] = dict(self.rope_parameters)
        if self.position_embedding == "rope":
            out["model_type"] = ROPE_MODEL_TYPE
            del out["position_embedding"]  # implied by model_type; keeps config.json a plain LlamaConfig
        else:
            out["model_type"] = ABSOLUTE_MODEL_TYPE
        return out


def _standard_rope_parameters(rope: dict | None) -> dict:
    """rope_parameters as transformers 5 writes them: {"rope_type": "default", "rope_theta": float}."""
    rope = dict(rope or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"rope_type {rope_type!r} (RoPE scaling) is not implemented in leanseq; only 'default' RoPE is"
        )
    theta = rope.pop("rope_theta", DEFAULT_ROPE_THETA)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"config key 'rope_theta' must be a positive number, got {theta!r}")
    check_number("rope_theta", theta, above=0)
    if rope:
        raise ConfigError(f"unknown rope_parameters keys {sorted(rope)} for default RoPE (known: rope_type, rope_theta)")
    return {"rope_theta": float(theta), "rope_type": "default"}


# ---- state --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TransformerState(State):
    """A KV cache. Row b holds position[b] valid entries at the start of its capacity slots.

    Stepping appends the new keys to these buffers in place (no copy per token) and returns a state sharing
    them. States still behave as values: the buffers remember how far they were written (`_frontier`), and
    stepping a state that another one already wrote past (branching from an old state) copies it first.
    """

    k: torch.Tensor  # (n_layers, B, n_kv_heads, capacity, head_dim)
    v: torch.Tensor  # (n_layers, B, n_kv_heads, capacity, head_dim)

    def _map(self, fn_layered, fn_position) -> State:
        out = super()._map(fn_layered, fn_position)
        frontier = getattr(self, "_frontier", None)
        if frontier is not None and out.k.data_ptr() == self.k.data_ptr() and out.k.device == self.k.device:
            out._frontier = frontier  # to() or detach() that kept the buffers: still shared
        return out

    def writable(self) -> TransformerState:
        """This state, or a copy of it where another state sharing the buffers already wrote past it."""
        frontier = getattr(self, "_frontier", None)
        if frontier is not None and bool((frontier.written > self.position).any()):
            return self.clone()
        return self

    def advanced(self, n_new: int) -> TransformerState:
        """The state after n_new tokens were written into these buffers at each row's position."""
        frontier = getattr(self, "_frontier", None) or _Frontier()
        out = TransformerState(position=self.position + n_new, k=self.k, v=self.v)
        frontier.written = out.position
        out._frontier = frontier
        return out

    @property
    def capacity(self) -> int:
        return int(self.k.shape[3])

    def with_capacity(self, capacity: int) -> TransformerState:
        """The same cache in buffers of `capacity` slots (zero-padded, so masked slots are always finite)."""
        if capacity == self.capacity:
            return self
        if capacity < int(self.position.max()):
            raise ValueError(f"capacity {capacity} is smaller than a row's position {int(self.position.max())}")
        keep = min(capacity, self.capacity)

        def resized(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(*t.shape[:3], capacity, t.shape[4])
            out[:, :, :, :keep] = t[:, :, :, :keep]
            return out

        out = TransformerState(position=self.position, k=resized(self.k), v=resized(self.v))
        if self._is_trusted():  # the same values, zero-padded
            out._trust()
        return out

    def reserve(self, n_new: int, limit: int | None = None) -> TransformerState:
        """Room for n_new more tokens in every row: the capacity doubles until they fit (O(log N) copies),
        but stays within `limit` slots (an absolute-position model has no use for more) when that suffices."""
        needed = int(self.position.max()) + n_new
        capacity = max(self.capacity, 1)
        while capacity < needed:
            capacity *= 2
        if limit is not None:
            capacity = max(min(capacity, limit), needed)
        return self.with_capacity(capacity)

    @classmethod
    def concat(cls, states: list[State]) -> State:
        if states and all(isinstance(s, TransformerState) for s in states):
            first = states[0]

            def layout(s):  # (n_layers, n_kv_heads, head_dim): what must agree between caches
                return s.k.shape[0], s.k.shape[2], s.k.shape[4]

            for s in states[1:]:
                if layout(s) != layout(first):
                    raise ValueError(
                        f"cannot concatenate KV caches of different models: {tuple(s.k.shape)} vs {tuple(first.k.shape)}"
                    )
                if s.k.dtype != first.k.dtype:
                    raise ValueError(f"cannot concatenate KV caches of dtypes {first.k.dtype} and {s.k.dtype}")
            capacity = max(s.capacity for s in states)
            states = [s.with_capacity(capacity) for s in states]
        return super().concat(states)


class _Frontier:
    """Shared by the states over one pair of cache buffers: the positions they were written up to, per row."""

    __slots__ = ("written",)

    def __init__(self):
        self.written = None


# ---- model --------------------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D); cos, sin (B or 1, L, D): rotate each pair (i, i + D/2) by its position's angle."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclasses.dataclass
class LayerCache:
    """One layer's slice of the KV cache during a cached forward."""

    k: torch.Tensor  # (B, n_kv_heads, capacity, head_dim)
    v: torch.Tensor  # (B, n_kv_heads, capacity, head_dim)
    write_at: torch.Tensor  # (B, L) the slots (= positions) of the new entries
    kv_len: int  # S: the slots any row can see after this chunk
    from_start: bool  # every row starts at position 0 (a first prefill): plain causal attention suffices
    in_place: bool  # False when autograd needs the old buffers: write into a copy instead

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k_new, v_new (B, n_kv_heads, L, head_dim) at each row's slots; return the first S slots."""
        if not self.in_place:
            self.k, self.v = self.k.clone(), self.v.clone()
        rows = torch.arange(k_new.shape[0], device=k_new.device)[:, None]
        # indexing (rows, :, write_at) addresses a (B, L, n_kv_heads, head_dim) block
        self.k[rows, :, self.write_at] = k_new.transpose(1, 2)
        self.v[rows, :, self.write_at] = v_new.transpose(1, 2)
        return self.k[:, :, : self.kv_len], self.v[:, :, : self.kv_len]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, rope, cache: LayerCache | None = None):
        """x (B, L, D); rope (cos, sin) or None; with a cache, attend to its valid entries plus the new ones."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout = self.dropout if self.training else 0.0
        groups = self.n_heads // self.n_kv_heads
        if cache is not None and cache.from_start:
            cache.append(k, v)  # an empty cache holds nothing to attend to: plain causal attention below
        if cache is None or cache.from_start:
            if groups > 1 and not _SDPA_HAS_GQA:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, **gqa)
        else:
            keys, values = cache.append(k, v)  # (B, KV, S, hd)
            y = self._attend_to_cache(q, keys, values, cache.write_at, dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))

    def _attend_to_cache(self, q, keys, values, positions, dropout: float) -> torch.Tensor:
        """q (B, H, L, hd) at positions (B, L) over cache slots keys, values (B, KV, S, hd) -> (B, H, L, hd).

        Query t of row b (at position[b] + t) sees slots 0 .. its position: causal and within its row's valid
        prefix. The queries go in pieces of at most _CACHED_ATTENTION_BUDGET // (groups * S), so the mask is
        never L x S, and each piece reads only the slots its last query can see.
        """
        B, _, L, hd = q.shape
        groups = self.n_heads // self.n_kv_heads
        # the query heads sharing a key/value head become one longer query, so the cache is never copied
        q = q.view(B, self.n_kv_heads, groups, L, hd)
        piece = max(1, _CACHED_ATTENTION_BUDGET // (groups * keys.shape[2]))
        outputs = []
        for start in range(0, L, piece):
            at = positions[:, start : start + piece]  # (B, c)
            c = at.shape[1]
            seen = int(at.max()) + 1  # slots any query of this piece sees
            mask = torch.arange(seen, device=q.device) <= at[:, :, None]  # (B, c, seen)
            mask = mask.repeat(1, groups, 1)[:, None]  # (B, 1, groups * c, seen), the grouped query layout
            q_piece = q[:, :, :, start : start + c].reshape(B, self.n_kv_heads, groups * c, hd)
            y = F.scaled_dot_product_attention(
                q_piece, keys[:, :, :seen], values[:, :, :seen], attn_mask=mask, dropout_p=dropout)
            outputs.append(y.view(B, self.n_kv_heads, groups, c, hd))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)  # (B, KV, groups, L, hd)
        return y.reshape(B, self.n_heads, L, hd)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerBody(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "absolute":
            self.embed_positions = embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class TransformerLM(LanguageModel):
    config_class = TransformerConfig
    state_class = TransformerState
    hf_architecture = "LlamaForCausalLM"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.model = TransformerBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # float32 RoPE frequencies per device
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small-normal init for training from scratch; residual outputs scaled by 1/sqrt(2 * n_layers)."""
        if self.lm_head.weight.is_meta:  # built to be loaded: the checkpoint's tensors replace everything
            return
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(p, std=std)

    # ---- positions ------------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape (B or 1, L, head_dim) for integer positions (B or 1, L), as transformers computes them."""
        device = positions.device
        if device not in self._inv_freq:
            dim = self.config.head_dim
            exponents = torch.arange(0, dim, 2, dtype=torch.float) / dim
            self._inv_freq[device] = (1.0 / (self.config.rope_theta ** exponents)).to(device)
        freqs = positions[..., None].float() * self._inv_freq[device]  # (B, L, hd/2), float32 whatever the dtype
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _check_positions(self, last_position: int) -> None:
        limit = self.config.max_position_embeddings
        if self.config.position_embedding == "absolute" and last_position >= limit:
            raise ValueError(
                f"position {last_position} is past max_position_embeddings={limit} of this absolute-position "
                f"model; it has no embedding for positions >= {limit}"
            )

    # ---- state ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, capacity: int = 64) -> TransformerState:
        """An empty KV cache for batch_size rows with `capacity` slots each (it doubles when full)."""
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"batch_size and capacity must be >= 1, got {batch_size} and {capacity}")
        cfg = self.config
        if cfg.position_embedding == "absolute":
            capacity = min(capacity, cfg.max_position_embeddings)
        like = self.model.embed_tokens.weight  # not lm_head: quantize_int8 may make it an Int8Linear
        device = like.device if device is None else device
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, capacity, cfg.head_dim)
        # zeros, not empty: slots past a row's position are masked, and a masked NaN would still poison softmax
        k = torch.zeros(shape, dtype=like.dtype, device=device)
        return TransformerState(
            position=torch.zeros(batch_size, dtype=torch.long, device=device), k=k, v=torch.zeros_like(k)
        )

    # not lm_head: quantize_int8 may make it an Int8Linear, whose int8 weights are not the model's dtype
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device  # direct: a parameters() walk costs more than a state check

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def state_spec(self, batch_size: int) -> dict[str, TensorSpec]:
        cfg = self.config
        # the capacity (slots per row) is free: the cache grows by doubling
        kv = TensorSpec((cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, None, cfg.head_dim),
                        ("n_layers", "batch", "n_kv_heads", "capacity", "head_dim"), self.dtype)
        return {"position": self._position_spec(batch_size), "k": kv, "v": kv}

    def check_state(self, state, batch_size: int, check_values: bool | None = None) -> None:
        super().check_state(state, batch_size, check_values)
        if state.v.shape != state.k.shape:
            raise ValueError(
                f"state tensor 'v' has shape {tuple(state.v.shape)} but 'k' has {tuple(state.k.shape)}; "
                "a KV cache's keys and values have the same capacity"
            )
        last = int(state.position.max())
        if last > state.capacity:
            raise ValueError(
                f"state tensor 'position' holds {last}, past the KV cache's capacity of {state.capacity} slots"
            )
        limit = self.config.max_position_embeddings
        if self.config.position_embedding == "absolute" and last > limit:
            raise ValueError(
                f"state tensor 'position' holds {last}, past max_position_embeddings={limit} of this "
                "absolute-position model"
            )

    # ---- forward --------------------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, state: TransformerState | None, last: int | None = None):
        x, state = self._hidden(self.model.embed_tokens(input_ids), state, last=last)  # (B, L, D)
        return self.lm_head(x), state  # (B, L or last, V)

    def _hidden(self, x: torch.Tensor, state: TransformerState | None, step: bool = False, last: int | None = None):
        L = x.shape[1]
        steps = torch.arange(L, device=x.device)
        if state is None:
            positions = steps[None]  # (1, L), shared by every row
            self._check_positions(L - 1)
        else:
            positions = state.position[:, None] + steps  # (B, L): each row continues from its own position
            kv_len = int(state.position.max()) + L  # cache slots any row needs after this chunk
            self._check_positions(kv_len - 1)
            absolute = self.config.position_embedding == "absolute"
            state = state.reserve(L, limit=self.config.max_position_embeddings if absolute else None).writable()
        rope = None
        if self.config.position_embedding == "absolute":
            x = x + self.model.embed_positions(positions)
        else:
            rope = self._rope(positions, x.dtype)
        if state is None:
            for block in self.model.layers:
                x = block(x, rope)
        else:
            from_start = not bool(state.position.any())  # else Attention._attend_to_cache masks each row
            # appending in place is what makes decoding O(1) per token; under autograd it would overwrite
            # tensors saved for backward (chunked training), so then each layer writes into a copy
            in_place = not (torch.is_grad_enabled() and (
                state.k.requires_grad or any(p.requires_grad for p in self.parameters())))
            caches = [LayerCache(state.k[i], state.v[i], positions, kv_len, from_start, in_place)
                      for i in range(self.config.num_hidden_layers)]
            for block, cache in zip(self.model.layers, caches):
                x = block(x, rope, cache)
            if in_place:
                state = state.advanced(L)
            else:
                k, v = torch.stack([c.k for c in caches]), torch.stack([c.v for c in caches])
                state = TransformerState(position=state.position + L, k=k, v=v)
        if last is not None:  # logits for the last positions only: norm and LM head skip the others
            x = x[:, -last:]
        return self.model.norm(x), state

    def _forward_last(self, input_ids: torch.Tensor, state: TransformerState | None, n: int):
        return self._forward(input_ids, state, last=n)

    def _step(self, token_ids: torch.Tensor, state: TransformerState):
        # the compiled whole-step kernel when it applies (leanseq.ops.decode_transformer says when)
        out = decode_transformer.try_step(self, token_ids, state)
        if out is not None:
            return out
        logits, state = self._forward(token_ids[:, None], state)
        return logits[:, 0], state

    def invalidate_native(self) -> None:
        """Drop the native decode plan; the next step rebuilds it (rarely needed, see leanseq.ops.decode)."""
        decode_transformer.decode.invalidate(self)


__all__ = ["TransformerConfig", "TransformerLM", "TransformerState"]
