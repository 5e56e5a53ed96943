"""Tokenizers for text in and out: one small interface, two implementations, one loader.

    tok = load_tokenizer("path/to/checkpoint")      # tokenizer.json (Hugging Face) or leanseq's byte marker
    ids = tok.encode("ROMEO: But soft!")            # list[int]
    text = tok.decode(ids)
    stream = tok.stream_decoder()
    for token_id in generated_ids:                  # as a model produces them
        print(stream.push(token_id), end="")        # multi-byte characters come out whole
    print(stream.finish())
    tok.save("out/dir")                             # round-trips through load_tokenizer

Implementations:
- `ByteTokenizer`: ids 0..255 are the bytes of the UTF-8 text; special tokens follow from 256
  (`<|endoftext|>` = 256 by default, used as bos, eos and pad, as GPT-2 does). Pure Python, no dependency.
  Saved as tokenizer_config.json with `"tokenizer_class": "LeanseqByteTokenizer"` (the marker
  `load_tokenizer` looks for); transformers has no such class, so AutoTokenizer cannot load it.
- `HFTokenizer`: a `tokenizers` library tokenizer read from tokenizer.json (the Hugging Face format), with
  bos/eos/pad and a chat template from tokenizer_config.json when present. All tokenization is the
  library's; nothing here re-implements BPE. Saved as tokenizer.json + tokenizer_config.json
  (`PreTrainedTokenizerFast`), which transformers' AutoTokenizer loads.
- `train_bpe(files, vocab_size)`: a byte-level BPE trained by `tokenizers` on text files -> HFTokenizer.

Special-token strings inside the text given to `encode` become their ids in both implementations (as
Hugging Face tokenizers do); `decode` writes them back as their strings unless `skip_special_tokens`.
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from leanseq.fileio import SHARED, write_file_atomic

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
BYTE_TOKENIZER_CLASS = "LeanseqByteTokenizer"
BYTE_TOKENIZER_VERSION = 1
ENDOFTEXT = "<|endoftext|>"
# How many ids a streaming decoder holds back while the text ends in an incomplete character, before it
# decides the bytes are invalid (not a character still arriving) and lets them out as U+FFFD instead of
# holding text back forever. With one id per byte that is exact: a UTF-8 character has at most 4 bytes. A
# BPE token can end in the middle of a character and the next one again, several times over in CJK text, so
# there the bound is only a generous guard.
MAX_HELD_IDS = 4
MAX_HELD_IDS_MULTIBYTE = 32
REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Text from token ids as they arrive: `push(id)` returns the text that is now final (maybe "").

    Works for any tokenizer by decoding a short window of recent ids and emitting only what is new, and
    holding text back while it ends in an incomplete UTF-8 sequence (which decodes to U+FFFD). Decoding a
    window rather than single ids keeps word-initial spaces right for tokenizers whose decoders depend on
    the neighbouring token. `finish()` returns whatever is still held.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read]: context, already emitted; ids[read:]: not yet emitted
        self._read = 0

    def push(self, token_id) -> str:
        token_id = _as_id(token_id, self.tokenizer.vocab_size)
        self._ids.append(token_id)
        full = self.tokenizer.decode(self._ids[self._prefix:], self.skip_special_tokens)
        if full.endswith(REPLACEMENT) and len(self._ids) - self._read < self.tokenizer.max_held_ids:
            return ""  # a character is still arriving
        new = self._new_text(full)
        self._read = len(self._ids)
        self._prefix = self._clean_context_start()
        if self._prefix > 64:  # only the context window is needed; keep the list short
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new

    def _new_text(self, full: str) -> str:
        done = self.tokenizer.decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        # the context window decodes cleanly (see _clean_context_start), so `full` starts with `done`
        return full[len(done):]

    def _clean_context_start(self) -> int:
        """Where the next context window starts: the last already-emitted token(s), going back until they
        decode without a U+FFFD, so the window never opens in the middle of a character (a window that did
        would decode differently alone than inside the longer text). No context if none is clean nearby."""
        for start in range(self._read - 1, max(-1, self._read - 1 - MAX_HELD_IDS), -1):
            if REPLACEMENT not in self.tokenizer.decode(self._ids[start:self._read], self.skip_special_tokens):
                return start
        return self._read

    def extend(self, token_ids: Iterable) -> str:
        return "".join(self.push(t) for t in _as_id_list(token_ids, self.tokenizer.vocab_size))

    def finish(self) -> str:
        """The held-back text (an incomplete character comes out as U+FFFD); the decoder starts afresh."""
        full = self.tokenizer.decode(self._ids[self._prefix:], self.skip_special_tokens)
        new = self._new_text(full)
        self._ids, self._prefix, self._read = [], 0, 0
        return new


def _as_id(value, vocab_size: int) -> int:
    """One token id as a Python int, refusing floats, bools and ids outside [0, vocab_size)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a 0-d torch/numpy value
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"token ids must be integers, got {value!r} ({type(value).__name__})")
    if not 0 <= value < vocab_size:
        raise ValueError(f"token id {value} is outside the vocabulary (valid ids: 0..{vocab_size - 1})")
    return value


def _as_id_list(ids, vocab_size: int) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}; use encode() for text")
    if hasattr(ids, "tolist"):  # a torch tensor or numpy array
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}; "
                             "decode one row at a time")
        if hasattr(ids, "is_floating_point") and ids.is_floating_point():
            raise TypeError(f"token ids must be integers, got a {ids.dtype} tensor")
        ids = ids.tolist()
    return [_as_id(i, vocab_size) for i in ids]


def _check_text(text) -> str:
    if not isinstance(text, str):
        hint = "; decode bytes first (bytes.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"encode() takes a str, got {type(text).__name__}{hint}")
    return text


class Tokenizer(abc.ABC):
    """What leanseq needs from a tokenizer. Token ids are Python ints in [0, vocab_size)."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    max_held_ids: int = MAX_HELD_IDS_MULTIBYTE  # see MAX_HELD_IDS; ByteTokenizer sets the exact bound

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (a model's embedding needs at least this many rows)."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the tokenizer's files into folder `path` (created if needed); returns the files written."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Every special token's string -> id."""

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._encode(_check_text(text))
        if add_bos:
            ids.insert(0, self._required("bos"))
        if add_eos:
            ids.append(self._required("eos"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._decode(_as_id_list(ids, self.vocab_size), skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def _required(self, which: str) -> int:
        value = getattr(self, f"{which}_token_id")
        if value is None:
            raise ValueError(f"this tokenizer has no {which} token; set {which}_token in its {TOKENIZER_CONFIG}")
        return value

    def _special_config(self) -> dict:
        """bos/eos/pad token strings for tokenizer_config.json."""
        names = {i: s for s, i in self.special_tokens.items()}
        out = {}
        for which in ("bos", "eos", "pad"):
            token_id = getattr(self, f"{which}_token_id")
            if token_id is not None:
                out[f"{which}_token"] = names[token_id]
        return out


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the special tokens (default `<|endoftext|>` = 256 for bos/eos/pad)."""

    max_held_ids = MAX_HELD_IDS

    def __init__(self, special_tokens: Sequence[str] = (ENDOFTEXT,), bos_token: str | None = ENDOFTEXT,
                 eos_token: str | None = ENDOFTEXT, pad_token: str | None = ENDOFTEXT,
                 chat_template: str | None = None):
        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens must be distinct, got {specials}")
        self._specials = {s: 256 + i for i, s in enumerate(specials)}
        self._names = {i: s for s, i in self._specials.items()}
        for which, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token is not None and token not in self._specials:
                raise ValueError(f"{which}_token {token!r} is not one of the special tokens {specials}")
            setattr(self, f"{which}_token_id", None if token is None else self._specials[token])
        self.chat_template = chat_template
        # longest first, so a special token that contains another is matched whole
        alternatives = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if specials else None

    @property
    def vocab_size(self) -> int:
        return 256 + len(self._specials)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def _encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # re.split puts the captured separators at odd positions
                ids.append(self._specials[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                parts.append(self._names[i])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, path: str | os.PathLike) -> list[Path]:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": BYTE_TOKENIZER_CLASS,
            "leanseq_byte_tokenizer": {"version": BYTE_TOKENIZER_VERSION, "special_tokens": list(self._specials)},
            **self._special_config(),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        target = folder / TOKENIZER_CONFIG
        _write_json(target, config)
        return [target]

    @classmethod
    def from_config(cls, config: dict, where: Path) -> ByteTokenizer:
        info = config.get("leanseq_byte_tokenizer")
        if not isinstance(info, dict) or not isinstance(info.get("special_tokens"), list):
            raise ValueError(  # noqa: TRY004 (a damaged file's content: ValueError, like bad JSON)
                f"{where}: tokenizer_class is {BYTE_TOKENIZER_CLASS} but 'leanseq_byte_tokenizer' "
                             "with a 'special_tokens' list is missing; re-save it with ByteTokenizer().save()")
        if info.get("version") != BYTE_TOKENIZER_VERSION:
            raise ValueError(f"{where}: byte tokenizer format version {info.get('version')!r} is not supported "
                             f"(this leanseq reads version {BYTE_TOKENIZER_VERSION}); upgrade leanseq")
        return cls(info["special_tokens"], bos_token=_token_string(config.get("bos_token")),
                   eos_token=_token_string(config.get("eos_token")),
                   pad_token=_token_string(config.get("pad_token")), chat_template=config.get("chat_template"))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self._specials)})"


def _token_string(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ..., ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _write_json(path: Path, data: dict) -> None:
    write_file_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", mode=SHARED)


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - tokenizers comes with the dev extra
        raise ImportError("reading tokenizer.json needs the `tokenizers` package: pip install 'leanseq[text]'") \
            from exc
    return tokenizers


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json) with the special tokens named by tokenizer_config.json."""

    def __init__(self, tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, extra_config: dict | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._extra_config = dict(extra_config or {})
        for which, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            token_id = None
            if token is not None:
                token_id = tokenizer.token_to_id(token)
                if token_id is None:
                    raise ValueError(f"{which}_token {token!r} is not in the tokenizer's vocabulary")
            setattr(self, f"{which}_token_id", token_id)

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_file: Path | None = None) -> HFTokenizer:
        tokenizers = _import_tokenizers()
        tokenizer_file = tokenizer_file or folder / TOKENIZER_JSON
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the library raises a plain Exception for malformed files
            raise ValueError(f"{tokenizer_file} is not a valid tokenizers file: {exc}") from exc
        config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
        specials = {which: _token_string(config.get(f"{which}_token")) for which in ("bos", "eos", "pad")}
        if not any(specials.values()) and tok.token_to_id(ENDOFTEXT) is not None:
            # no config (a bare tokenizer.json, e.g. one trained by train_bpe): GPT-2's convention
            specials = dict.fromkeys(specials, ENDOFTEXT)
        keep = {k: v for k, v in config.items() if k in ("model_max_length", "clean_up_tokenization_spaces")}
        return cls(tok, **{f"{k}_token": v for k, v in specials.items()}, chat_template=config.get("chat_template"),
                   extra_config=keep)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: bos/eos are added by encode()'s flags, the same way for every tokenizer
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> list[Path]:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / TOKENIZER_JSON
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, target)
        # PreTrainedTokenizerFast reads tokenizer.json as is: transformers' AutoTokenizer loads this folder
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._extra_config, **self._special_config()}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json(folder / TOKENIZER_CONFIG, config)
        return [target, folder / TOKENIZER_CONFIG]

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, model={type(self.tokenizer.model).__name__})"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in checkpoint folder `path` (or a tokenizer.json file).

    A tokenizer_config.json whose tokenizer_class is LeanseqByteTokenizer gives a ByteTokenizer; otherwise a
    tokenizer.json gives an HFTokenizer (with specials and chat template from tokenizer_config.json).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path}: expected a checkpoint folder or a tokenizer.json file")
        return HFTokenizer.from_folder(path.parent, tokenizer_file=path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    config_path = path / TOKENIZER_CONFIG
    config = _read_json(config_path) if config_path.is_file() else {}
    if config.get("tokenizer_class") == BYTE_TOKENIZER_CLASS:
        return ByteTokenizer.from_config(config, config_path)
    if (path / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_folder(path)
    raise FileNotFoundError(
        f"no tokenizer in {path}: expected {TOKENIZER_JSON} (Hugging Face tokenizers format) or a "
        f"{TOKENIZER_CONFIG} with \"tokenizer_class\": \"{BYTE_TOKENIZER_CLASS}\". Copy the tokenizer files "
        f"from where the model came from, or write one with leanseq.text.ByteTokenizer().save({str(path)!r})"
    )


def train_bpe(files: Sequence[str | os.PathLike], vocab_size: int, *,
              special_tokens: Sequence[str] = (ENDOFTEXT,), min_frequency: int = 2,
              show_progress: bool = True) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style: any text encodes, nothing is unknown) trained by `tokenizers`.

    vocab_size counts the 256 byte symbols and the special tokens; the first special token becomes
    bos/eos/pad.
    """
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("train_bpe needs at least one text file")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"training text {p} does not exist")
    minimum = 256 + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an integer >= {minimum} (256 bytes + {len(special_tokens)} "
                         f"special tokens), got {vocab_size!r}")
    tok = tokenizers.Tokenizer(models.BPE())
    # use_regex=True splits on GPT-2's word boundaries first, so merges never cross words
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in paths], trainer)
    first = special_tokens[0] if special_tokens else None
    return HFTokenizer(tok, bos_token=first, eos_token=first, pad_token=first)
