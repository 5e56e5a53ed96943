"""The generation engine: one prefill, then recurrent steps, with sampling kept apart from the models.

`stream_tokens` checks its arguments and returns a generator that yields each new token as soon as it is
chosen; `generate` collects it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(temperature, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would fail later or silently sample garbage (NaN, inf, floats for counts).

    temperature None (the default everywhere) or 0 means greedy; top_k / top_p then have no effect.
    """
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_repetition_penalty(penalty) -> None:
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, numbers.Real)
                                or not math.isfinite(penalty) or penalty <= 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {penalty!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty (Keskar et al. 2019, CTRL): for every token already in the row (prompt
    and generated, `seen` (B, V) bool), a positive logit is divided by `penalty` and a negative one multiplied,
    so penalty > 1 makes repeats less likely whatever the logit's sign."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def eos_list(model, eos_token_id) -> list[int]:
    """eos_token_id (an id, a list of ids or None) as a checked list of ids within the model's vocabulary."""
    ids = [] if eos_token_id is None else list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) \
        else [eos_token_id]
    for i in ids:
        if not _is_int(i) or not 0 <= i < model.vocab_size:
            raise ValueError(f"eos_token_id must be token ids in [0, {model.vocab_size}) or None, got {eos_token_id!r}")
    return ids


def as_prompt_tensor(model, input_ids):
    """A list of token ids (one prompt) or a list of equal-length lists (a batch) -> (B, L) LongTensor; tensors
    pass unchanged. Prompts of different lengths are refused: padding them would feed pad tokens into the
    recurrent state of the shorter rows."""
    if isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise ValueError("input_ids is empty; pass at least one token")
        rows = input_ids if all(isinstance(r, (list, tuple)) for r in input_ids) else [input_ids]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(
                f"prompts of different lengths ({', '.join(map(str, lengths))} tokens) cannot share one tensor: "
                "padding would enter the shorter rows' state. Generate them one at a time, or use "
                "leanseq.text.generate, which prefills each prompt alone and then steps them together")
        if not all(_is_int(t) for r in rows for t in r):
            raise TypeError("input_ids must hold integer token ids")
        return torch.tensor(rows, dtype=torch.long, device=model.device).reshape(len(rows), lengths[0])
    return input_ids


def sample_next(
    logits: torch.Tensor,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row from logits (B, V). temperature None or 0 means greedy (argmax)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    check_sampling(temperature, top_k, top_p)
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise FloatingPointError("logits contain NaN or +inf; the model or its state is corrupt")
    if not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise FloatingPointError("a row of logits is -inf everywhere: no token can be chosen")
    logits = logits.float()
    if not temperature:
        return logits.argmax(dim=-1)
    # shift each row's maximum to 0 before dividing, and divide in float64: a tiny temperature then sends
    # every other logit towards -inf (greedy in the limit) instead of overflowing to inf and a NaN softmax
    shifted = logits.double() - logits.amax(dim=-1, keepdim=True).double()
    logits = (shifted / temperature).float()  # (B, V), row maxima exactly 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stream_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    state=None,
    repetition_penalty: float | None = None,
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens tokens (each a (B,) LongTensor), prefilling the prompt in one chunked pass.

    Greedy unless a temperature > 0 is given. A row that produced one of the eos ids repeats that id until
    every row is done. Every argument is checked here, when called (also for max_new_tokens=0), not when the
    first token is drawn.
    """
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    check_repetition_penalty(repetition_penalty)
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    eos_ids = eos_list(model, eos_token_id)
    input_ids = as_prompt_tensor(model, input_ids)
    model.check_input_ids(input_ids)
    if state is not None:
        model.check_state(state, input_ids.shape[0])
    return _stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_ids, state,
                   repetition_penalty or 1.0)


@torch.no_grad()
def _stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_ids, state, penalty):
    if max_new_tokens == 0:
        return
    device = input_ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    seen = None
    if penalty != 1.0:  # which ids each row holds so far (prompt included), for the repetition penalty
        seen = torch.zeros(input_ids.shape[0], model.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.long(), True)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    # the prefill only needs the next token's logits: "last" skips the (L x vocab) LM-head product
    logits, state = model(input_ids, state=state, return_state=True, logits="last")
    next_logits = logits[:, -1]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    done_token = torch.zeros_like(finished, dtype=torch.long)
    for i in range(max_new_tokens):
        if seen is not None:
            next_logits = apply_repetition_penalty(next_logits.float(), seen, penalty)
        token = sample_next(next_logits, temperature, top_k, top_p, generator)
        if eos_ids:
            token = torch.where(finished, done_token, token)  # a finished row repeats its eos
            newly = ~finished & torch.isin(token, eos)
            done_token = torch.where(newly, token, done_token)
            finished |= newly
        if seen is not None:
            seen[torch.arange(token.shape[0], device=device), token] = True
        yield token
        if i + 1 == max_new_tokens or (eos_ids and bool(finished.all())):
            return
        next_logits, state = model.step(token, state)
