"""The contract every leanseq language model follows.

    logits = model(input_ids)                                   # (B, L) -> (B, L, V)
    logits = model(input_ids, logits="last")                    # (B, L) -> (B, 1, V): next-token logits only
    logits, state = model(input_ids, state=s, return_state=True)  # continue from s, return the state after
    state = model.init_state(batch_size)
    logits, state = model.step(token_ids, state)                # (B,) -> (B, V)
    model.generate(...), model.generate_stream(...), model.save_pretrained(path), leanseq.load(path)

Subclasses implement `_forward(input_ids, state) -> (logits, state)`, `init_state` and usually a faster
`_step`, and may override `_forward_last` to skip the LM head on positions whose logits nobody asked for. Inputs are validated here once, so every model rejects bad input with the same clear errors.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from leanseq.models import checkpoint as ckpt
from leanseq.models.config import ConfigBase
from leanseq.models.generation import as_prompt_tensor, stream_tokens
from leanseq.models.state import State, TensorSpec, _placement, validate_state
from leanseq.ops.export_mode import is_exporting


def logit_positions(logits, seq_len: int) -> int | None:
    """The `logits` argument of forward -> None (every position) or n (the last n positions)."""
    if isinstance(logits, str):
        if logits == "all":
            return None
        if logits == "last":
            return 1
    elif isinstance(logits, int) and not isinstance(logits, bool):
        if 1 <= logits <= seq_len:
            return None if logits == seq_len else logits
        raise ValueError(f"logits={logits} asks for the last {logits} positions, but the input has {seq_len} "
                         f"tokens; pass an int in [1, {seq_len}], 'last' or 'all'")
    raise ValueError(f"logits must be 'all', 'last' or an int (the last n positions), got {logits!r}")


class LanguageModel(nn.Module, metaclass=abc.ABCMeta):
    config_class: ClassVar[type[ConfigBase]]
    state_class: ClassVar[type[State]]

    def __init__(self, config):
        super().__init__()
        self.config = config
        # generation_config.json as read from the checkpoint (written back on save); None when it had none
        self.generation_config: dict | None = None
        # a tokenizer attached by leanseq.text.load (any object with .save(folder)); save_pretrained writes it
        self.tokenizer = None

    # ---- to implement -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, input_ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State | None]:
        """(B, L) ids and a state (or None: no state wanted) -> (logits (B, L, V), new state or None)."""

    @abc.abstractmethod
    def init_state(self, batch_size: int, device=None) -> State:
        """A fresh state for `batch_size` rows: the state before any token."""

    def _step(self, token_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, state = self._forward(token_ids[:, None], state)
        return logits[:, 0], state

    def _forward_last(self, input_ids: torch.Tensor, state: State | None, n: int):
        """`_forward` with logits for the last n positions only, (B, n, V). This default slices the full
        logits (a copy, so the (B, L, V) tensor is freed); models override it to skip the LM head instead."""
        logits, state = self._forward(input_ids, state)
        return logits[:, -n:].clone(), state

    # ---- the shared contract ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights, hence of the logits."""
        return next(self.parameters()).dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def check_input_ids(self, input_ids, rank: int = 2, what: str = "input_ids", check_range: bool = True) -> None:
        """Refuse anything but a (batch, seq_len) (rank 2) or (batch,) (rank 1) tensor of integer token ids in
        [0, vocab_size). check_range=False leaves the range to the caller (model.step: the native kernel checks
        it, and refuses with this method's own error)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"{what} must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
        if input_ids.dim() != rank:
            shape = "(batch, seq_len)" if rank == 2 else "(batch,)"
            raise ValueError(f"{what} must have shape {shape}, got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"{what} is empty (shape {tuple(input_ids.shape)}); pass at least one token")
        if not check_range or is_exporting():  # a graph has no token values to check; the runtime's gather refuses
            return
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")

    def state_spec(self, batch_size: int) -> dict[str, TensorSpec]:
        """Every state field's full shape and dtype for `batch_size` rows. This default reads them off
        init_state(1); families override it with their own (cheaper, and with named dimensions)."""
        specs = {}
        for name, t in self.init_state(1).tensors().items():
            batch_dim = 0 if name == "position" else 1
            shape = tuple(batch_size if i == batch_dim else n for i, n in enumerate(t.shape))
            dims = tuple("batch" if i == batch_dim else f"dim{i}" for i in range(t.dim()))
            specs[name] = TensorSpec(shape, dims, t.dtype)
        return specs

    def _position_spec(self, batch_size: int) -> TensorSpec:
        return TensorSpec((batch_size,), ("batch",), torch.long)

    def check_state(self, state, batch_size: int, check_values: bool | None = None) -> None:
        """Refuse a state that does not fit this model: the one check before any state reaches a kernel.

        Checks the class, every field, each tensor's full shape, dtype and device, positions >= 0, and that
        floating values are finite. check_values=None skips the value check for states this model returned
        (or that passed it) and that were not modified since; True forces it, False skips it.
        Raises TypeError (wrong class, type or dtype) or ValueError naming the tensor.
        """
        position = getattr(state, "position", None)
        if isinstance(position, torch.Tensor) and position.dim() == 1 and position.shape[0] != batch_size:
            raise ValueError(f"state holds {position.shape[0]} rows (its 'position' has shape {tuple(position.shape)}) "
                             f"but the input has batch size {batch_size}")
        if check_values is None and isinstance(state, self.state_class) and state._vouched_for(self):
            return  # this model's own output, untouched since: nothing about it can have changed
        validate_state(state, self.state_class, self.state_spec(batch_size), self.device, check_values)

    def forward(self, input_ids: torch.Tensor, state: State | None = None, return_state: bool = False,
                logits: str | int = "all"):
        """input_ids (B, L) -> logits, or (logits, state after the input) with return_state=True.

        `logits` says which positions get logits: "all" (default) -> (B, L, V); "last" -> (B, 1, V), the
        next-token logits, without the (L x vocab) LM-head product over the other positions (a prefill that
        only samples the next token needs no more); an int n in [1, L] -> the last n positions, (B, n, V).
        """
        self.check_input_ids(input_ids)
        keep_last = logit_positions(logits, input_ids.shape[1])
        if state is not None:
            self.check_state(state, input_ids.shape[0])
        elif return_state:
            state = self.init_state(input_ids.shape[0], device=input_ids.device)
        if keep_last is None:
            out, new_state = self._forward(input_ids.long(), state)
        else:
            out, new_state = self._forward_last(input_ids.long(), state, keep_last)
        if new_state is not None:
            new_state._vouch(self)  # this model's own output: the next call need not re-check it
        return (out, new_state) if return_state else out

    def forward_hidden(self, inputs_embeds: torch.Tensor, state: State | None = None, return_state: bool = False):
        """The backbone alone, for other ends than the LM head: embeddings in, final (normed) hidden states out.

        inputs_embeds (B, L, hidden_size) in the model's dtype and device -> hidden (B, L, hidden_size), or
        (hidden, state after the input) with return_state=True. A value encoder (leanseq.series) or a nucleotide
        embedding (leanseq.dna) feeds it; a classification or regression head reads it. Same state contract as
        forward: running a sequence in chunks, passing the state on, equals running it whole.
        """
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError("inputs_embeds must be a (batch, length, hidden_size) tensor, got "
                             f"{type(inputs_embeds).__name__}{tuple(getattr(inputs_embeds, 'shape', ()))}")
        hidden_size = int(self.config.hidden_size)
        B, L, D = inputs_embeds.shape
        if D != hidden_size or L < 1 or B < 1:
            raise ValueError(f"inputs_embeds has shape {(B, L, D)}; expected (batch >= 1, length >= 1, "
                             f"{hidden_size}) for this model's hidden_size={hidden_size}")
        if inputs_embeds.dtype != self.dtype or inputs_embeds.device != self.device:
            raise TypeError(f"inputs_embeds is {inputs_embeds.dtype} on {inputs_embeds.device}; the model is "
                            f"{self.dtype} on {self.device} (convert with .to(dtype=..., device=...))")
        if state is not None:
            self.check_state(state, B)
        elif return_state:
            state = self.init_state(B, device=inputs_embeds.device)
        hidden, new_state = self._hidden(inputs_embeds, state)
        if new_state is not None:
            new_state._vouch(self)
        return (hidden, new_state) if return_state else hidden

    def _hidden(self, inputs_embeds: torch.Tensor, state: State | None, step: bool = False,
                last: int | None = None) -> tuple[torch.Tensor, State | None]:
        """(B, L, D) embeddings and a state (or None) -> (final normed hidden (B, L, D), new state or None)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its backbone (forward_hidden)")

    def step(self, token_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Consume one token per row: token_ids (B,) -> (logits (B, V), new state)."""
        self.check_input_ids(token_ids, rank=1, what="token_ids", check_range=False)
        batch = token_ids.shape[0]
        placement = _placement(self)  # read once: the vouch check and the new state's mark both compare it
        # a state this model returned and nobody changed since skips check_state (unless a family adds checks)
        if not (type(self).check_state is LanguageModel.check_state and type(state) is self.state_class
                and state._vouched_for(self, placement) and state.position.shape == (batch,)):
            self.check_state(state, batch)
        if token_ids.dtype != torch.long:
            token_ids = token_ids.long()
        out = self._native_step(token_ids, state)  # range-checks the ids itself, with check_input_ids' error
        if out is None:
            self.check_input_ids(token_ids, rank=1, what="token_ids")
            out = self._step(token_ids, state)
        logits, new_state = out
        new_state._vouch(self, placement)
        return logits, new_state

    def eos_token_ids(self) -> list[int]:
        """The ids generation stops at by default: generation_config.json's eos_token_id when the checkpoint had
        one, else config.json's; ids outside the vocabulary (which can never be produced) are left out."""
        source = self.generation_config if self.generation_config and "eos_token_id" in self.generation_config \
            else {"eos_token_id": getattr(self.config, "eos_token_id", None)}
        value = source["eos_token_id"]
        ids = value if isinstance(value, list) else [] if value is None else [value]
        return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size]

    def _native_step(self, token_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State] | None:
        """A compiled whole step for model.step, or None to run `_step`. Gets a checked state and int64 ids of
        the right shape whose range is NOT checked yet: it must refuse an id outside the vocabulary with
        check_input_ids' ValueError before anything reads it."""
        return None

    def generate_stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        *,
        ignore_eos: bool = False,
        repetition_penalty: float | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield one (B,) tensor of new tokens at a time: one chunked prefill, then recurrent steps.

        Greedy unless a temperature > 0 is given. Stops at eos_token_id, by default the model's own
        (eos_token_ids(); ignore_eos=True generates max_new_tokens regardless). input_ids may be a list of
        ids or of equal-length lists.
        """
        eos = None if ignore_eos else self.eos_token_ids() if eos_token_id is None else eos_token_id
        return stream_tokens(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos,
                             repetition_penalty=repetition_penalty)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        *,
        ignore_eos: bool = False,
        repetition_penalty: float | None = None,
    ) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens tokens: (B, L + new). Options as generate_stream."""
        input_ids = as_prompt_tensor(self, input_ids)
        new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                                        ignore_eos=ignore_eos, repetition_penalty=repetition_penalty))
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _tied_keys(self) -> tuple[str, ...]:
        """Checkpoint keys that alias another tensor and are left out of saved files."""
        if getattr(self, "quantization", None) is not None:
            from leanseq.ops.quant import shared_keys

            return shared_keys(self)  # an int8 head tied to int8 embeddings is stored once
        return ("lm_head.weight",) if getattr(self.config, "tie_word_embeddings", False) else ()

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> Path:
        """Write config.json + model.safetensors (atomically) that transformers loads with identical logits.

        generation_config.json is written when the model has one. The tokenizer (given here, or attached as
        model.tokenizer) is written beside the weights with its own save(folder), in the same atomic write;
        special-token ids the config leaves unstated are taken from it, so generation elsewhere stops at eos too.
        """
        foreign = [name for name, m in self.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
        if foreign:
            raise TypeError(f"{foreign[0]} is a {type(self.get_submodule(foreign[0])).__name__} (torch.ao dynamic "
                            "quantization), which has no checkpoint form: save the float32 model, or quantise with "
                            "`leanseq quantize` / leanseq.ops.quant.quantize_int8, whose int8 checkpoints load back")
        tensors = {k: v for k, v in self.state_dict().items() if k not in self._tied_keys()}
        config = self.config.to_dict()
        if getattr(self, "quantization", None) is not None:
            from leanseq.ops.quant import QUANTIZED_MODEL_TYPE, quantization_config

            # the family moves into the record and model_type names the int8 format, so loaders that do not
            # know it (transformers, llama.cpp's converter) refuse the folder instead of filling in random weights
            config["quantization_config"] = {**quantization_config(self), "model_type": config["model_type"]}
            config["model_type"] = QUANTIZED_MODEL_TYPE
        config["architectures"] = [self.hf_architecture] if getattr(self, "hf_architecture", None) \
            and getattr(self, "quantization", None) is None else []  # no transformers class reads int8 files
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(tokenizer, key, None)
                if key not in config and value is not None:
                    config[key] = value
        return ckpt.write_checkpoint(path, config, tensors, generation_config=self.generation_config,
                                     extra_writer=None if tokenizer is None else tokenizer.save)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
        raw_config = ckpt.read_config(path)
        quant_record = raw_config.pop("quantization_config", None)
        if quant_record is not None:
            from leanseq.ops.quant import QUANTIZED_MODEL_TYPE

            if raw_config.get("model_type") == QUANTIZED_MODEL_TYPE and isinstance(quant_record, dict):
                raw_config["model_type"] = quant_record.get("model_type")
        config = cls.config_class.from_dict(raw_config)
        # The config is checked against the safetensors headers before any tensor is allocated or read, so a
        # config that disagrees with its files (vocab_size: 20000000 beside 97 rows) is refused at no cost.
        headers = ckpt.read_headers(path)
        if config.num_hidden_layers > len(headers):  # every layer holds tensors; also bounds the build below
            raise ckpt.CheckpointError(
                f"{Path(path) / ckpt.CONFIG_FILE} says num_hidden_layers={config.num_hidden_layers}, but the "
                f"checkpoint holds only {len(headers)} tensors in all"
            )
        try:
            with torch.device("meta"):  # shapes without storage: nothing allocated, nothing initialised
                model = cls(config)
        except (RuntimeError, TypeError, OverflowError) as exc:  # sizes past what torch can index
            reason = str(exc).splitlines()[0]
            raise ckpt.CheckpointError(
                f"{Path(path) / ckpt.CONFIG_FILE} describes a model that cannot be built ({reason})"
            ) from exc
        config_file = Path(path) / ckpt.CONFIG_FILE
        if quant_record is not None:
            from leanseq.ops.quant import apply_quantization_config

            if dtype not in (None, torch.float32):
                raise ckpt.CheckpointError(
                    f"{Path(path)} holds an int8 (leanseq_int8) model, which computes in float32; load it without "
                    f"dtype={dtype}, or convert the float32 model it was quantised from")
            try:
                apply_quantization_config(model, quant_record, str(config_file))
            except ValueError as exc:
                raise ckpt.CheckpointError(str(exc)) from exc
        elif any(name.endswith(".qweight") for name in headers):
            raise ckpt.CheckpointError(
                f"{Path(path)} holds int8 tensors ({next(n for n in headers if n.endswith('.qweight'))}) but "
                f"{config_file} has no quantization_config, so they cannot be read as float weights: restore the "
                "quantization_config that `leanseq quantize` wrote there, or load the float32 checkpoint instead")
        ckpt.check_headers(model, headers, optional=model._tied_keys())
        tensors = ckpt.read_tensors(path, headers)
        # a load keeps the checkpoint's floating dtype unless asked otherwise
        float_dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
        target = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
        for k, v in tensors.items():  # one tensor at a time, so a conversion never holds two copies of the model
            if v.is_floating_point():
                tensors[k] = v.to(target)
        ckpt.load_state_dict_strict(model, tensors, optional=model._tied_keys(), assign=True)
        if quant_record is not None:
            from leanseq.ops.quant import check_int8_tensors

            try:
                check_int8_tensors(model, str(Path(path)))
            except ValueError as exc:
                raise ckpt.CheckpointError(str(exc)) from exc
        model.generation_config = ckpt.read_generation_config(path)
        if device is not None:
            model.to(device)
        return model.eval()
