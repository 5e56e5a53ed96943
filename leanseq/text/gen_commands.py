"""`leanseq generate` and `leanseq chat`: text in, text out, with llama.cpp's short flags.

    leanseq generate -m DIR_OR_HUB_ID -p "ROMEO:" -n 64 -t 0.8 --top-p 0.95 --stop "\\n\\n"
    leanseq generate --ids -p "1 2 3"                     # token ids in and out (any checkpoint)
    leanseq chat -m DIR_OR_HUB_ID

One default with the Python API: greedy unless -t/--temperature > 0. Without -m the bundled byte-level
Shakespeare Mamba is used (with --ids: the bundled tiny random token-id checkpoint).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from leanseq.argtypes import int_at_least, positive_int

DEFAULT_MAX_NEW_TOKENS = 128






def _number(low: float, high: float | None = None, *, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value) or value < low or (open_low and value == low) or \
            (high is not None and value > high)
        if bad:
            rng = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a finite number {rng}, got {text!r}")
        return value
    return parse


def _stop_string(text: str) -> str:
    # a shell cannot easily pass a newline, so the usual escapes are understood: --stop "\n\n"
    value = text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8") if "\\" in text else text
    if not value:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return value


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint folder or Hugging Face Hub id in the local cache (default: the bundled "
                   "Shakespeare Mamba; with --ids the bundled tiny token-id one)")
    p.add_argument("-n", "--max-new-tokens", type=int_at_least(0), default=max_new_tokens,
                   help=f"tokens to generate at most (default {max_new_tokens})")
    p.add_argument("-t", "--temperature", type=_number(0.0), default=None,
                   help="sampling temperature; without it (or 0) generation is greedy")
    p.add_argument("--top-k", type=int_at_least(1), default=None, help="sample among the k likeliest (needs -t)")
    p.add_argument("--top-p", type=_number(0.0, 1.0, open_low=True), default=None,
                   help="nucleus sampling: the likeliest tokens holding this much probability (needs -t)")
    p.add_argument("--repetition-penalty", type=_number(0.0, open_low=True), default=None,
                   help="transformers' repetition penalty (> 1 discourages repeats; 1 = off)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", type=_stop_string, default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable; may span tokens; not printed; \\n allowed)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-text token")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


def register(subparsers) -> None:
    from leanseq.energy import add_cli_arguments

    p = subparsers.add_parser(
        "generate", help="continue a prompt, streaming the text as it is generated",
        description="Stream a continuation of a prompt. Greedy unless -t/--temperature > 0. Stops at the "
        "end-of-text token, a --stop string or -n tokens. Speed goes to stderr.")
    add_sampling_arguments(p, DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("-p", "--prompt", default=None, help="the prompt text (with --ids: space-separated token ids)")
    p.add_argument("--ids", action="store_true", help="prompt and output are token ids (no tokenizer needed)")
    p.set_defaults(func=run_generate)

    c = subparsers.add_parser(
        "chat", help="talk to a model; the conversation lives in its recurrent state",
        description="An interactive chat. Each turn feeds only the new text to the model's state (nothing is "
        "re-read or truncated). Commands: /save FILE, /load FILE, /reset, /quit (or Ctrl-D).")
    add_sampling_arguments(c, 256)
    c.add_argument("--system", default=None, help="a system message (with a chat template that supports it)")
    c.add_argument("--no-template", action="store_true",
                   help="use the plain 'User: ...\\nAssistant:' format even when the tokenizer has a chat template")
    add_cli_arguments(c)
    c.set_defaults(func=run_chat)


BUNDLED_TEXT_MODEL = "shakespeare-mamba"  # a byte-level Mamba trained here (docs/shakespeare_mamba.md)
BUNDLED_IDS_MODEL = "tiny-mamba"  # random weights, token ids only: what --ids uses without -m


def _model_path(args):
    from leanseq.models.commands import bundled_checkpoint

    if args.model:
        return args.model, False
    return bundled_checkpoint(BUNDLED_IDS_MODEL if getattr(args, "ids", False) else BUNDLED_TEXT_MODEL), True


def _check_sampling_flags(args) -> None:
    if not args.temperature and (args.top_k is not None or args.top_p is not None):
        flag = "--top-k" if args.top_k is not None else "--top-p"
        raise ValueError(f"{flag} only applies when sampling; generation is greedy unless -t/--temperature > 0 "
                         "is given as well")


def _options(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed, "ignore_eos": args.ignore_eos}


def load_for_text(args):
    """(model, tokenizer or None, path): the tokenizer is required unless ids mode."""
    import leanseq
    from leanseq.models import hub
    from leanseq.text.tokenizer import load_tokenizer

    path, bundled = _model_path(args)
    folder = hub.resolve(path)
    model = leanseq.load(folder)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError as exc:
        if not (getattr(args, "ids", False) or bundled):
            raise FileNotFoundError(f"{exc}; or pass --ids to give and get token ids") from None
    return model, tokenizer, path, bundled


def run_generate(args) -> int:
    import torch

    from leanseq.text import pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_sampling_flags(args)
    model, tokenizer, path, bundled = load_for_text(args)
    ids_mode = args.ids or tokenizer is None
    prompt = args.prompt if args.prompt is not None else ("1 2 3 4" if ids_mode else "")
    t0 = time.perf_counter()
    first, n = None, 0
    if ids_mode:
        try:
            ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            hint = " (the bundled tiny checkpoint has no tokenizer: give -m a text model)" if bundled else ""
            raise ValueError(f"--prompt must be space-separated integer token ids with --ids, got {prompt!r}"
                             f"{hint}") from None
        if not ids:
            raise ValueError("--prompt is empty; give at least one token id")
        stream = model.generate_stream([ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                       args.seed, ignore_eos=args.ignore_eos,
                                       repetition_penalty=args.repetition_penalty)
        print(f"model: {path} ({model.config.model_type}, {model.num_parameters():,} parameters)", file=sys.stderr)
        for token in stream:
            first = first if first is not None else time.perf_counter() - t0
            n += 1
            print(int(token[0]), end=" ", flush=True)
        print()
    else:
        pieces = pipeline.stream_text(model, tokenizer, prompt, args.max_new_tokens, stop=args.stop,
                                      **_options(args))
        sys.stdout.write(prompt)  # as llama.cpp: the prompt, then its continuation
        sys.stdout.flush()
        for piece in pieces:
            first = first if first is not None else time.perf_counter() - t0
            n += 1
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    total = time.perf_counter() - t0
    if first is not None:
        what = "tokens" if ids_mode else "text pieces"
        decode = (total - first) / max(n - 1, 1)
        print(f"prefill + first: {first * 1e3:.1f} ms; then {decode * 1e3:.2f} ms per {what[:-1]} "
              f"({n} {what}, {1 / decode if decode > 0 else float('inf'):.0f}/s)", file=sys.stderr)
    return 0


def run_chat(args) -> int:
    import torch

    from leanseq.energy import meter_kwargs_from_args
    from leanseq.text.chat import run_chat_loop

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_sampling_flags(args)
    model, tokenizer, path, _ = load_for_text(args)
    if tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer; chat needs a text model (tokenizer.json or a leanseq "
                                "byte tokenizer beside the weights)")
    return run_chat_loop(model, tokenizer, options=_options(args), stop=args.stop, max_new_tokens=args.max_new_tokens,
                         system=args.system, use_template=not args.no_template,
                         meter_kwargs=meter_kwargs_from_args(args))
