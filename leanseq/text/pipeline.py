"""Text in, text out: a model with its tokenizer, streaming generation with stop strings, batches of prompts.

    model, tok = leanseq.text.load("path/or/hub-id")           # model.tokenizer is set too
    for piece in leanseq.text.stream_text(model, tok, "ROMEO:", max_new_tokens=64, stop=["\\n\\n"]):
        print(piece, end="", flush=True)
    text = leanseq.text.generate(model, tok, "ROMEO:", temperature=0.8, top_p=0.95, seed=0)
    texts = leanseq.text.generate(model, tok, ["a prompt", "a longer prompt"])   # one result per prompt

One default everywhere: greedy unless a temperature > 0 is given (as `leanseq generate`). Generation stops at
the model's eos (generation_config.json / config.json), else the tokenizer's, unless ignore_eos=True; at a
stop string (which may span tokens; neither it nor anything after it is returned); or after max_new_tokens.

Batches: each prompt is prefilled alone into its own row of a leanseq.stream.SessionPool, then the rows step
together, so no pad token ever enters a row's recurrent state and each row gets what it would get alone (with a
seed, every row samples from its own generator seeded alike).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence

import torch

from leanseq.models.generation import (
    apply_repetition_penalty,
    check_repetition_penalty,
    check_sampling,
    eos_list,
    sample_next,
)
from leanseq.text.tokenizer import Tokenizer, load_tokenizer


def load(path: str | os.PathLike, device=None, dtype=None):
    """(model, tokenizer) from a checkpoint folder or Hub id; the tokenizer is also set as model.tokenizer,
    so model.save_pretrained(dir) writes it beside the weights. A folder without a tokenizer is an error that
    says so (load the model alone with leanseq.load)."""
    import leanseq
    from leanseq.models import hub

    folder = hub.resolve(path)
    model = leanseq.load(folder, device=device, dtype=dtype)
    tokenizer = load_tokenizer(folder)
    check_vocab(model, tokenizer)
    model.tokenizer = tokenizer
    return model, tokenizer


def check_vocab(model, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.vocab_size}: "
                         "they do not belong together")


class StopStrings:
    """Holds back generated text that could be the start of a stop string, and cuts the text at the first one.

    push(text) -> (text that is now final, whether a stop string was reached); finish() -> the held text.
    """

    def __init__(self, stops: Sequence[str] = ()):
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = list(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0  # the longest end of the text that a stop string begins with
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def finish(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if not temperature and (top_k is not None or top_p is not None):
        # the model-level API ignores them when greedy; here (and on the command line) that would hide a mistake
        which = "top_k" if top_k is not None else "top_p"
        raise ValueError(f"{which} only applies when sampling, and generation is greedy without a temperature; "
                         "give a temperature > 0 (e.g. 0.8) as well")
    check_repetition_penalty(repetition_penalty)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")


def default_eos(model, tokenizer: Tokenizer | None) -> list[int]:
    """The model's eos ids (generation_config.json, then config.json), else the tokenizer's eos."""
    ids = model.eos_token_ids()
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return [i for i in ids if 0 <= i < model.vocab_size]


class RowSampler:
    """One row's choice of tokens and its text: sampling settings, seen ids, streaming decoder, stop strings."""

    def __init__(self, model, tokenizer: Tokenizer, prompt_ids: list[int], *, temperature=None, top_k=None,
                 top_p=None, repetition_penalty=None, seed=None, stop=(), eos_ids=(), max_new_tokens=128):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.penalty = repetition_penalty or 1.0
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.eos = set(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.stops = StopStrings(stop)
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.vocab = tokenizer.vocab_size  # ids past it (a padded embedding) cannot be decoded: never chosen
        self.seen = None
        if self.penalty != 1.0:
            self.seen = torch.zeros(1, model.vocab_size, dtype=torch.bool)
            self.seen[0, prompt_ids] = True
        self.ids: list[int] = []
        self.done = max_new_tokens == 0
        self.stopped_by: str | None = "length" if self.done else None

    def choose(self, logits: torch.Tensor) -> int:
        logits = logits.detach().float().cpu().reshape(1, -1)
        if self.vocab < logits.shape[1]:
            logits[:, self.vocab:] = -math.inf
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        return int(sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator)[0])

    def accept(self, token: int) -> str:
        """Record the chosen token; the text it makes final (maybe ""). Sets done at eos, stop or length."""
        self.ids.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        if token in self.eos:
            self.stopped_by = "eos"
            return self._flush(self.decoder.finish())
        text, stopped = self.stops.push(self.decoder.push(token))
        if stopped:
            self.done, self.stopped_by = True, "stop"
            return text
        if len(self.ids) >= self.max_new_tokens:
            self.stopped_by = "length"
            return text + self._flush(self.decoder.finish())
        return text

    def _flush(self, held: str) -> str:
        self.done = True
        text, stopped = self.stops.push(held)
        if stopped:
            self.stopped_by = "stop"
            return text
        return text + self.stops.finish()


def encode_prompt(model, tokenizer: Tokenizer, prompt: str, add_bos: bool = False) -> list[int]:
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    if not ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("the prompt is empty and the tokenizer has no bos token to start from; give a prompt")
        ids = [tokenizer.bos_token_id]  # an empty prompt starts a new document
    return ids


def _setup(model, tokenizer, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
           eos_token_id, ignore_eos):
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    check_vocab(model, tokenizer)
    StopStrings(stop)  # checked now, not at the first token
    if ignore_eos:
        return []
    return default_eos(model, tokenizer) if eos_token_id is None else eos_list(model, eos_token_id)


def stream_text(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 128, *, temperature=None,
                top_k=None, top_p=None, repetition_penalty=None, seed=None, stop: Sequence[str] = (),
                eos_token_id=None, ignore_eos: bool = False, add_bos: bool = False,
                prefill_chunk_size: int = 256, session=None) -> Iterator[str]:
    """Yield the generated text in pieces as tokens arrive (multi-byte characters whole). Arguments are
    checked when called. `session` (a leanseq.stream.Session of batch 1) continues a stream instead of
    starting one; it then holds the prompt and every generated token."""
    from leanseq.stream import Session

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}; for several use generate()")
    eos = _setup(model, tokenizer, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                 eos_token_id, ignore_eos)
    ids = encode_prompt(model, tokenizer, prompt, add_bos)
    session = session if session is not None else Session(model, prefill_chunk_size=prefill_chunk_size)
    row = RowSampler(model, tokenizer, ids, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty, seed=seed, stop=stop, eos_ids=eos,
                     max_new_tokens=max_new_tokens)
    return _stream_one(session, ids, row)


def _stream_one(session, ids, row: RowSampler) -> Iterator[str]:
    logits = session.push(ids, keep_logits=False)
    while not row.done:
        token = row.choose(logits)
        piece = row.accept(token)
        logits = session.push(token)  # the chosen token enters the state, so the stream can go on later
        if piece:
            yield piece


def stream_batch(model, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, *,
                 temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=None,
                 stop: Sequence[str] = (), eos_token_id=None, ignore_eos: bool = False, add_bos: bool = False,
                 prefill_chunk_size: int = 256) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, text piece) as the rows generate. Each prompt is prefilled alone into its own pool
    row (no padding); the unfinished rows then step together in one batched model.step."""
    from leanseq.stream import SessionPool

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str")
    if not prompts:
        raise ValueError("prompts is empty")
    eos = _setup(model, tokenizer, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                 eos_token_id, ignore_eos)
    encoded = [encode_prompt(model, tokenizer, p, add_bos) for p in prompts]
    rows = [RowSampler(model, tokenizer, ids, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, eos_ids=eos,
                       max_new_tokens=max_new_tokens) for ids in encoded]
    return _stream_pool(SessionPool(model, prefill_chunk_size), encoded, rows)


def _stream_pool(pool, encoded, rows) -> Iterator[tuple[int, str]]:
    logits = {}
    for i, ids in enumerate(encoded):
        pool.open(i)
        logits[i] = pool.push(i, ids, keep_logits=False)
    while True:
        chosen = {}
        for i, row in enumerate(rows):
            if row.done:
                continue
            token = row.choose(logits[i])
            piece = row.accept(token)
            if piece:
                yield i, piece
            if not row.done:
                chosen[i] = token
        if not chosen:
            return
        logits = pool.step(chosen)


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 128, **options):
    """The generated text (without the prompt) for one prompt, or a list of texts for a list of prompts.
    Options as stream_text."""
    if isinstance(prompt, str):
        return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **options))
    out = [""] * len(prompt)
    for i, piece in stream_batch(model, tokenizer, prompt, max_new_tokens, **options):
        out[i] += piece
    return out
