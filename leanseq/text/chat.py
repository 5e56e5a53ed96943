"""A conversation kept in a model's recurrent state: each turn feeds only its new text.

    chat = ChatSession(model, tokenizer)           # chat template from tokenizer_config.json when present
    for piece in chat.reply("Hello!"):
        print(piece, end="", flush=True)
    chat.save("talk.lsq"); chat.load("talk.lsq"); chat.reset()

How a turn's text is found: the whole conversation so far plus the new user message is rendered (the chat
template, or a plain "User: ...\\nAssistant:" format), and only what follows the text already in the state is
fed. The state is append-only, so where a rendering differs from what the model actually produced (a reply cut
by max_new_tokens before the template's end-of-turn), the new text is fed after what is there. Nothing is ever
re-read or truncated: a long conversation costs what its new tokens cost.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from leanseq.text.pipeline import RowSampler, StopStrings, _stream_one, check_vocab, default_eos
from leanseq.text.tokenizer import Tokenizer

PLAIN_STOP = "\nUser:"  # the plain format's next turn: the model must not speak for the user
CHAT_METADATA_VERSION = 1


def plain_render(messages: list[dict], add_generation_prompt: bool) -> str:
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(f"{m['content']}\n")
        elif m["role"] == "user":
            out.append(f"User: {m['content']}\nAssistant:")
        else:
            out.append(f"{m['content']}\n")
    del add_generation_prompt  # the user turn already ends with "Assistant:"
    return "".join(out)


def template_renderer(template: str, tokenizer: Tokenizer):
    """A renderer for a Hugging Face chat template, run by jinja2 in a sandbox as transformers does."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    specials = {f"{w}_token": names.get(getattr(tokenizer, f"{w}_token_id")) or "" for w in ("bos", "eos", "pad")}

    def render(messages, add_generation_prompt):
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
        except TemplateError as exc:
            raise ValueError(f"the tokenizer's chat template failed: {exc}") from exc

    return render


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    def __init__(self, model, tokenizer: Tokenizer, *, system: str | None = None, use_template: bool = True,
                 stop=(), max_new_tokens: int = 256, options: dict | None = None, prefill_chunk_size: int = 256):
        from leanseq.stream import Session

        check_vocab(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.options = dict(options or {})
        self.max_new_tokens = max_new_tokens
        self.render = None
        if use_template and tokenizer.chat_template:
            self.render = template_renderer(tokenizer.chat_template, tokenizer)
            if self.render is None:
                warnings.warn("the tokenizer has a chat template but jinja2 is not installed (pip install jinja2); "
                              "using the plain 'User: ...' format", stacklevel=2)
        self.format = "template" if self.render else "plain"
        if self.render is None:
            self.render = plain_render
        self.stop = list(stop) + ([PLAIN_STOP] if self.format == "plain" and PLAIN_STOP not in stop else [])
        StopStrings(self.stop)  # checked now
        self.system = system
        self.prefill_chunk_size = prefill_chunk_size
        self._session_class = Session
        self.reset()

    def reset(self) -> None:
        """Forget the conversation: a fresh state."""
        self.session = self._session_class(self.model, prefill_chunk_size=self.prefill_chunk_size)
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.fed = ""  # the text in the state: every prompt piece and generated token so far
        self.last_reply_tokens = 0

    def turn_text(self, user_text: str) -> str:
        """The text the next user message adds to the state (see the module docstring)."""
        full = self.render([*self.messages, {"role": "user", "content": user_text}], True)
        return full[_common_prefix_length(full, self.fed):]

    def reply(self, user_text: str) -> Iterator[str]:
        """Feed the user's turn and yield the reply's text as it is generated (stop strings not shown)."""
        if not isinstance(user_text, str):
            raise TypeError(f"a message must be a str, got {type(user_text).__name__}")
        delta = self.turn_text(user_text)
        ids = self.tokenizer.encode(delta)
        if not ids:
            raise ValueError("nothing to say: the message adds no text")
        eos = [] if self.options.get("ignore_eos") else default_eos(self.model, self.tokenizer)
        sampling = {k: v for k, v in self.options.items() if k != "ignore_eos"}
        row = RowSampler(self.model, self.tokenizer, ids, stop=self.stop, eos_ids=eos,
                         max_new_tokens=self.max_new_tokens, **sampling)
        self.fed += delta
        self.messages.append({"role": "user", "content": user_text})
        shown = []
        try:
            for piece in _stream_one(self.session, ids, row):
                shown.append(piece)
                yield piece
        finally:  # also when the caller stops early (Ctrl-C): the state holds what was generated so far
            self.fed += self.tokenizer.decode(row.ids, skip_special_tokens=False)
            self.messages.append({"role": "assistant", "content": "".join(shown)})
            self.last_reply_tokens = len(row.ids)

    def save(self, path: str | os.PathLike) -> Path:
        """The conversation (state, last logits, messages) as one checksummed state blob."""
        self.session.metadata = {"chat": {"version": CHAT_METADATA_VERSION, "messages": self.messages,
                                          "fed": self.fed, "format": self.format}}
        return self.session.save(path)

    def load(self, path: str | os.PathLike) -> None:
        """Continue the conversation saved in `path` (refused if it is another model's or not a chat's)."""
        session = self._session_class.load(self.model, path, prefill_chunk_size=self.prefill_chunk_size)
        chat = (session.metadata or {}).get("chat")
        if not isinstance(chat, dict) or chat.get("version") != CHAT_METADATA_VERSION or \
                not isinstance(chat.get("messages"), list) or not isinstance(chat.get("fed"), str):
            raise ValueError(f"{path} is a stream state but not a saved chat (no chat messages in it)")
        if chat.get("format") != self.format:
            raise ValueError(f"{path} was saved in the {chat.get('format')} chat format, this chat uses {self.format}")
        self.session, self.messages, self.fed = session, chat["messages"], chat["fed"]


HELP = "commands: /save FILE, /load FILE, /reset, /quit (or Ctrl-D); Ctrl-C stops a reply"


def run_chat_loop(model, tokenizer, *, options, stop, max_new_tokens, system, use_template, meter_kwargs,
                  stdin=None, stdout=None, stderr=None) -> int:
    """The interactive loop of `leanseq chat`: read a line, answer it, print a status line to stderr."""
    from leanseq.energy import Meter

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    chat = ChatSession(model, tokenizer, system=system, use_template=use_template, stop=stop,
                       max_new_tokens=max_new_tokens, options=options)
    meter = Meter(**meter_kwargs)
    print(f"chat ({chat.format} format; {HELP})", file=stderr)
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if not line:  # EOF (Ctrl-D)
            if interactive:
                stdout.write("\n")
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            if command in ("/quit", "/exit"):
                return 0
            try:
                if command == "/reset":
                    chat.reset()
                    print("(conversation reset)", file=stderr)
                elif command in ("/save", "/load") and not arg:
                    print(f"{command} needs a file name: {command} FILE", file=stderr)
                elif command == "/save":
                    print(f"(saved to {chat.save(arg)})", file=stderr)
                elif command == "/load":
                    chat.load(arg)
                    print(f"(loaded {arg}: {len(chat.messages)} messages, {chat.session.position} tokens)",
                          file=stderr)
                else:
                    print(f"unknown command {command}; {HELP}", file=stderr)
            except (ValueError, OSError) as exc:  # a bad file is reported, the chat goes on
                print(f"error: {exc}", file=stderr)
            continue
        t0 = time.perf_counter()
        with meter.measure() as window:
            try:
                for piece in chat.reply(line):
                    stdout.write(piece)
                    stdout.flush()
            except KeyboardInterrupt:
                stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
        wall = time.perf_counter() - t0
        n = chat.last_reply_tokens
        result = window.result
        per_token = f"{result.energy_j / n:.3g} J/token" if n else "no tokens"
        print(f"[{n} tokens, {n / wall if wall > 0 else 0:.1f} tokens/s, {per_token} ({result.method}); "
              f"state {chat.session.position} tokens]", file=stderr)
