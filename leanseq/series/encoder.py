"""Real-valued series in, predictions at every position out: a value encoder and a head around any leanseq backbone.

    model = SeriesModel.build("mamba", channels=1, out_features=2, task="classify", hidden_size=64, num_layers=2)
    model.fit_normalizer(train_values)                    # optional: per-channel scaling fitted on training data
    out = model(values)                                   # (B, L, C) -> (B, L, out_features): an answer per step
    state = model.init_state(B)
    out_t, state = model.step(values[:, t], state)        # (B, C) -> (B, out_features), one observation at a time
    model.save("run/model"); same = SeriesModel.load("run/model")
    model.save("run/clf", metadata={"class_names": ["walk", "run"]})   # a classifier's names, one per class:
                                                                        # `leanseq serve` answers with them

The backbone (Mamba-1, Mamba-2 or the transformer baseline) is used only through forward_hidden, init_state and
check_state, so the state contract is the language models': running a series in chunks, passing the state on,
equals running it whole, and step by step equals one forward.

Missing values: NaN marks a missing observation. The encoder feeds the value with NaN replaced by 0 together
with a per-channel 0/1 "missing" indicator, so the model can tell a missing value from a real zero. Infinite
values are refused. A series with no observed value at all is refused (there is nothing to answer from).

Normalisation: `fit_normalizer(train_values)` stores a per-channel mean and standard deviation of the training
data (NaN ignored) as buffers; every forward and every step subtracts and divides by them. Nothing is computed
from the series being read, so streaming sees the same transform as a batch forward and nothing looks ahead.
(Per-series z-normalisation needs the whole series first; the UCR/UEA sets ship already z-normalised.)

Unequal lengths: the model is causal, so a batch of series of different lengths is padded at the END (any
value, NaN included) and each series' answer is read at its own last position (`gather_last`); the padding is
never read into any answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanseq.models import checkpoint as ckpt

TASKS = ("classify", "regress")
FAMILIES = ("mamba", "mamba2", "transformer")
FORMAT_NAME = "leanseq-series"
FORMAT_VERSION = 1
SERIES_CONFIG_FILE = "series_config.json"
SERIES_WEIGHTS_FILE = "series.safetensors"
BACKBONE_DIR = "backbone"


class ValueEncoder(nn.Module):
    """(B, L, C) float values with NaN for missing -> (B, L, D) embeddings, one position at a time (no mixing
    across time, so step-by-step equals a whole forward). Each channel's value (NaN -> 0) and its missing flag
    go through a small MLP: a nonlinear value embedding, as a token embedding is for ids."""

    def __init__(self, channels: int, hidden_size: int):
        super().__init__()
        if channels < 1 or hidden_size < 1:
            raise ValueError(f"channels and hidden_size must be >= 1, got {channels} and {hidden_size}")
        self.channels = channels
        self.hidden_size = hidden_size
        self.proj_in = nn.Linear(2 * channels, hidden_size)
        self.proj_out = nn.Linear(hidden_size, hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(values)  # (B, L, C)
        filled = torch.where(missing, torch.zeros_like(values), values)
        x = torch.cat([filled, missing.to(values.dtype)], dim=-1)  # (B, L, 2C)
        return self.proj_out(nn.functional.gelu(self.proj_in(x)))  # (B, L, D)


@dataclasses.dataclass
class SeriesConfig:
    """What a SeriesModel is, beside its backbone's own config (kept in `backbone`)."""

    channels: int
    out_features: int
    task: str
    family: str
    backbone: dict  # the backbone's config.json content

    model_type = "leanseq_series"  # read by leanseq.stream's state-blob fingerprint

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _family_of(backbone) -> str:
    model_type = str(getattr(backbone.config, "model_type", ""))
    if model_type in ("mamba", "leanseq_mamba_lti"):
        return "mamba"
    if model_type == "mamba2":
        return "mamba2"
    if model_type in ("llama", "leanseq_transformer"):
        return "transformer"
    raise ValueError(f"backbone has model_type {model_type!r}; a SeriesModel takes a leanseq Mamba-1, Mamba-2 "
                     f"or transformer model")


def backbone_config(family: str, hidden_size: int, num_layers: int, **kw):
    """A small backbone config of `family`: vocab_size 1 (the token embedding is never read)."""
    if family == "mamba":
        from leanseq.models.mamba import MambaConfig

        return MambaConfig(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
                           **{"state_size": 16, **kw})
    if family == "mamba2":
        from leanseq.models.mamba2 import Mamba2Config

        head_dim = kw.pop("head_dim", 16)
        expand = kw.pop("expand", 2)
        if (hidden_size * expand) % head_dim:
            raise ValueError(f"mamba2: hidden_size * expand = {hidden_size * expand} must be a multiple of "
                             f"head_dim={head_dim}")
        return Mamba2Config(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers, expand=expand,
                            head_dim=head_dim, num_heads=hidden_size * expand // head_dim,
                            **{"n_groups": 1, "state_size": 16, "chunk_size": 64, "pad_token_id": None,
                               "bos_token_id": None, "eos_token_id": None, **kw})
    if family == "transformer":
        from leanseq.models.transformer import TransformerConfig

        heads = kw.pop("num_attention_heads", max(1, hidden_size // 32))
        return TransformerConfig(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                 num_attention_heads=heads,
                                 **{"intermediate_size": 4 * hidden_size, "max_position_embeddings": 4096, **kw})
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def _as_values(values, channels: int, rank: int, what: str, dtype, device) -> torch.Tensor:
    """Refuse anything but a finite-or-NaN floating tensor (or array) of the right rank and channel count."""
    if not isinstance(values, torch.Tensor):
        try:
            import numpy as np

            arr = np.asarray(values)
        except Exception as exc:  # anything numpy cannot read is the caller's input error
            raise TypeError(f"{what} must be a tensor or array of floats, got {type(values).__name__}") from exc
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{what} must hold numbers (floats, NaN for missing), got numpy dtype {arr.dtype}")
        values = torch.as_tensor(arr.astype("float64") if arr.dtype.kind in "iu" else arr)
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{what} must hold real numbers (floats, NaN for missing), got dtype {values.dtype}")
    if not values.dtype.is_floating_point:
        values = values.double()  # integer readings are fine: converted below
    shape = "(batch, length, channels)" if rank == 3 else "(batch, channels)"
    if values.dim() != rank:
        hint = " (one series of one channel? use x.reshape(1, -1, 1))" if rank == 3 and values.dim() < 3 else ""
        raise ValueError(f"{what} must have shape {shape}, got {tuple(values.shape)}{hint}")
    if values.shape[-1] != channels:
        raise ValueError(f"{what} has {values.shape[-1]} channels (last dimension) but the model was built for "
                         f"{channels}; shape must be {shape}")
    if values.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(values.shape)}); pass at least one observation")
    if torch.isinf(values).any():
        raise ValueError(f"{what} holds infinite values; use NaN for a missing observation")
    return values.to(device=device, dtype=dtype)


class SeriesModel(nn.Module):
    """ValueEncoder -> backbone.forward_hidden -> Linear head, at every position. task="classify": the outputs
    are class logits; "regress": real values (e.g. a forecast of the next observation)."""

    def __init__(self, backbone, channels: int, out_features: int, task: str = "classify"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        for name, v in (("channels", channels), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not hasattr(backbone, "forward_hidden"):
            raise TypeError(f"backbone must be a leanseq language model (with forward_hidden), got "
                            f"{type(backbone).__name__}")
        self.family = _family_of(backbone)
        self.backbone = backbone
        hidden_size = int(backbone.config.hidden_size)
        self.channels, self.out_features, self.task = channels, out_features, task
        self.encoder = ValueEncoder(channels, hidden_size).to(backbone.dtype)
        self.head = nn.Linear(hidden_size, out_features).to(backbone.dtype)
        # the normaliser: identity until fit_normalizer; buffers, so saved, moved and hashed with the weights
        self.register_buffer("value_mean", torch.zeros(channels, dtype=backbone.dtype))
        self.register_buffer("value_std", torch.ones(channels, dtype=backbone.dtype))

    @classmethod
    def build(cls, family: str = "mamba", channels: int = 1, out_features: int = 1, task: str = "classify",
              hidden_size: int = 64, num_layers: int = 2, seed: int | None = None, **kw) -> SeriesModel:
        """A fresh model with a small backbone of `family` ("mamba", "mamba2" or "transformer"); extra keyword
        arguments go to the backbone's config (e.g. state_size=32)."""
        from leanseq.models import model_class

        config = backbone_config(family, hidden_size, num_layers, **kw)
        if seed is not None:
            torch.manual_seed(seed)
        backbone = model_class(config.model_type)(config)
        return cls(backbone, channels, out_features, task)

    # ---- what the streaming runtime and the state checks read -------------------------------------------------
    @property
    def config(self) -> SeriesConfig:
        return SeriesConfig(self.channels, self.out_features, self.task, self.family, self.backbone.config.to_dict())

    @property
    def state_class(self):
        return self.backbone.state_class

    @property
    def output_size(self) -> int:
        return self.out_features

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def _used_parameters(self) -> list[torch.Tensor]:
        """Parameters a prediction reads: the backbone's token embedding and LM head are never used here."""
        return [p for n, p in self.named_parameters()
                if not (n.startswith("backbone.") and ("embed" in n or "lm_head" in n))]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._used_parameters())

    def num_bytes(self) -> int:
        """Bytes of the parameters a prediction reads, and of the normaliser, as stored."""
        return sum(t.numel() * t.element_size() for t in [*self._used_parameters(), *self.buffers()])

    def init_state(self, batch_size: int, device=None):
        return self.backbone.init_state(batch_size, device=device)

    def state_spec(self, batch_size: int):
        return self.backbone.state_spec(batch_size)

    def check_state(self, state, batch_size: int, check_values: bool | None = None) -> None:
        self.backbone.check_state(state, batch_size, check_values)

    # ---- normalisation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalizer(self, values) -> None:
        """Per-channel mean and std of training values (B, L, C) or (N, C), NaN ignored; applied to every input."""
        v = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
        v = v.double().reshape(-1, v.shape[-1])
        if v.shape[-1] != self.channels:
            raise ValueError(f"normaliser data has {v.shape[-1]} channels, the model {self.channels}")
        observed = ~torch.isnan(v)
        count = observed.sum(0)
        if (count == 0).any():
            raise ValueError(f"channel(s) {torch.nonzero(count == 0).flatten().tolist()} hold no observed value: "
                             "cannot fit a normaliser")
        mean = torch.where(observed, v, 0).sum(0) / count
        var = torch.where(observed, (v - mean) ** 2, 0).sum(0) / count.clamp(min=1)
        std = var.sqrt().clamp(min=1e-8)
        self.value_mean.copy_(mean.to(self.value_mean.dtype))
        self.value_std.copy_(std.to(self.value_std.dtype))

    # ---- the contract ---------------------------------------------------------------------------------------
    def check_values(self, values, rank: int = 3, what: str = "values") -> torch.Tensor:
        return _as_values(values, self.channels, rank, what, self.dtype, self.device)

    def _embed(self, values: torch.Tensor) -> torch.Tensor:
        return self.encoder((values - self.value_mean) / self.value_std)  # NaN stays NaN: the encoder flags it

    def features(self, values, state=None, return_state: bool = False):
        """values (B, L, C) -> final hidden states (B, L, D) (and the state after), without the head."""
        values = self.check_values(values)
        if state is None:
            empty = torch.isnan(values).all(dim=2).all(dim=1)  # (B,)
            if bool(empty.any()):
                raise ValueError(f"series {torch.nonzero(empty).flatten().tolist()[:10]} hold only missing (NaN) "
                                 "values; a series needs at least one observation")
        return self.backbone.forward_hidden(self._embed(values), state=state, return_state=return_state)

    def forward(self, values, state=None, return_state: bool = False, logits: str = "all"):
        """values (B, L, C) -> outputs (B, L, out_features) at every position (or (B, 1, out) with
        logits="last"), and the state after the input with return_state=True."""
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        if return_state and state is None:
            state = self.init_state(self.check_values(values).shape[0], device=self.device)
        out = self.features(values, state=state, return_state=return_state)
        hidden, new_state = out if return_state else (out, None)
        if logits == "last":
            hidden = hidden[:, -1:]
        y = self.head(hidden)  # (B, L, out_features)
        return (y, new_state) if return_state else y

    def step(self, values_t, state):
        """One observation per row: values_t (B, C) -> (outputs (B, out_features), new state). NaN = missing."""
        values_t = self.check_values(values_t, rank=2, what="values_t")
        y, state = self.forward(values_t[:, None], state=state, return_state=True)
        return y[:, 0], state

    def coerce_stream_input(self, values, batch_size: int):
        """What leanseq.stream.Session.push accepts for this model -> ((B, n, C) tensor, kind).

        kind (as for tokens) says how to shape the outputs back: (C,) one observation of a batch-1 stream ->
        "scalar"; (n, C) n observations of batch 1 -> "seq"; (B, C) with B > 1 -> "row"; (B, n, C) -> "batch".
        A plain float is one observation of a one-channel stream.
        """
        v = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
        if v.dim() == 0:
            v, kind = v.reshape(1, 1, 1), "scalar"
        elif v.dim() == 1:
            if batch_size != 1:
                if self.channels == 1 and v.shape[0] == batch_size:
                    v, kind = v.reshape(batch_size, 1, 1), "row"
                else:
                    raise ValueError(f"values of shape {tuple(v.shape)} do not fit a stream of {batch_size} rows "
                                     f"and {self.channels} channels: pass ({batch_size}, {self.channels})")
            elif v.shape[0] == self.channels:
                v, kind = v.reshape(1, 1, -1), "scalar"
            elif self.channels == 1:
                v, kind = v.reshape(1, -1, 1), "seq"
            else:
                raise ValueError(f"values of shape {tuple(v.shape)} do not fit {self.channels} channels")
        elif v.dim() == 2:
            if batch_size == 1:
                v, kind = v[None], "seq"
            elif v.shape[0] == batch_size:
                v, kind = v[:, None], "row"
            else:
                raise ValueError(f"values have {v.shape[0]} rows but the stream has {batch_size}")
        elif v.dim() == 3:
            if v.shape[0] != batch_size:
                raise ValueError(f"values have {v.shape[0]} rows but the stream has {batch_size}")
            kind = "batch"
        else:
            raise ValueError(f"values must be 0-d to 3-d, got shape {tuple(v.shape)}")
        return self.check_values(v), kind

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """One folder, written atomically: backbone/ (the backbone's own HF-layout checkpoint), series.safetensors
        (encoder, head, normaliser) and series_config.json (shape, task, family and `metadata`, e.g. class names)."""
        from safetensors.torch import save_file

        info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "channels": self.channels,
                "out_features": self.out_features, "task": self.task, "family": self.family,
                "metadata": metadata or {}}
        json.dumps(info)  # metadata must be JSON: fail before anything is written
        class_names(self, info["metadata"], "metadata")  # and its class names, if any, must fit this head
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                   if not k.startswith("backbone.")}

        def write(tmp: Path) -> None:
            self.backbone.save_pretrained(tmp / BACKBONE_DIR)
            save_file(tensors, str(tmp / SERIES_WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / SERIES_CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

        return ckpt.atomic_write_dir(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None, with_metadata: bool = False):
        """A model saved by save() (in eval mode); with_metadata=True returns (model, metadata). Refuses a
        folder that is not a series checkpoint, a corrupt file, or tensors that do not match the config."""
        return ckpt.read_consistently(Path(path), lambda folder: cls._load(folder, device, with_metadata))

    @classmethod
    def _load(cls, folder: Path, device, with_metadata: bool):
        from safetensors import safe_open

        from leanseq.models import load as load_backbone

        if not folder.is_dir():
            raise ckpt.CheckpointError(f"{folder} is not a directory; a series model is a folder written by "
                                       "SeriesModel.save")
        info = ckpt._read_json(folder / SERIES_CONFIG_FILE, f"a series model folder needs {SERIES_CONFIG_FILE}")
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            raise ckpt.CheckpointError(f"{folder / SERIES_CONFIG_FILE} is not a {FORMAT_NAME} config")
        if info.get("version") != FORMAT_VERSION:
            raise ckpt.CheckpointError(f"{folder / SERIES_CONFIG_FILE} has format version {info.get('version')!r}; "
                                       f"this leanseq reads version {FORMAT_VERSION}")
        for key in ("channels", "out_features"):
            if isinstance(info.get(key), bool) or not isinstance(info.get(key), int) or info[key] < 1:
                raise ckpt.CheckpointError(f"{folder / SERIES_CONFIG_FILE}: {key!r} must be a positive int")
        if info.get("task") not in TASKS:
            raise ckpt.CheckpointError(f"{folder / SERIES_CONFIG_FILE}: task must be one of {TASKS}")
        backbone = load_backbone(folder / BACKBONE_DIR)
        if _family_of(backbone) != info.get("family"):
            raise ckpt.CheckpointError(f"{folder}: config says family {info.get('family')!r} but the backbone is "
                                       f"{_family_of(backbone)!r}")
        model = cls(backbone, info["channels"], info["out_features"], info["task"])
        file = folder / SERIES_WEIGHTS_FILE
        os.close(ckpt._open_regular_file(file, "a series model folder needs series.safetensors"))
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as exc:  # safetensors raises its own error types
            raise ckpt.CheckpointError(f"cannot read {file}: it is corrupt or not a safetensors file ({exc})") from exc
        tensors.update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
        ckpt.load_state_dict_strict(model, tensors)
        if bool((model.value_std <= 0).any()):
            raise ckpt.CheckpointError(f"{file}: value_std must be positive")
        if device is not None:
            model.to(device)
        model.eval()
        metadata = info.get("metadata") if isinstance(info.get("metadata"), dict) else {}
        try:
            class_names(model, metadata, f"{folder / SERIES_CONFIG_FILE}")
        except ValueError as exc:
            raise ckpt.CheckpointError(str(exc)) from exc
        return (model, metadata) if with_metadata else model


def class_names(model, metadata: dict, where: str) -> list[str] | None:
    """The class names a classifier was saved with (metadata "class_names": one string per output, in the head's
    order), or None when there are none. Names that do not fit the model raise ValueError naming `where`."""
    names = metadata.get("class_names")
    if names is None:
        return None
    if model.task != "classify":
        raise ValueError(f"{where}: 'class_names' is for a classifier; this model's task is {model.task!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: 'class_names' must be a list of strings, got {names!r:.80}")
    if len(names) != model.out_features:
        raise ValueError(f"{where}: {len(names)} class names for a head of {model.out_features} classes; give one "
                         "name per class, in the head's order")
    return list(names)


def pad(series: list) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (length_i, C) arrays (or 1-D, one channel) -> (values (N, L_max, C) float32 padded at the end with
    NaN, lengths (N,)). A causal reader never reads the padding into an answer (see gather_last)."""
    rows = [np.asarray(s, dtype=np.float32).reshape(len(s), -1) for s in series]
    lengths = torch.tensor([len(r) for r in rows])
    out = np.full((len(rows), int(lengths.max()), rows[0].shape[1]), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out), lengths


def gather_last(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """outputs (B, L, F) and per-series lengths (B,) -> each series' output at its own last position (B, F)."""
    index = (lengths.to(outputs.device).long() - 1).clamp(min=0)[:, None, None].expand(-1, 1, outputs.shape[-1])
    return outputs.gather(1, index)[:, 0]
