"""Text: tokenizers, the Shakespeare corpus, a byte-level language-model task and the energy race.

    from leanseq.text import ByteTokenizer, load_tokenizer, load_corpus
    tok = load_tokenizer("path/to/checkpoint")         # tokenizer.json or leanseq's byte tokenizer
    train_bytes = load_corpus("train")                 # after `make setup` (or python -m leanseq.text.corpus prepare)
    model, tok = load("path/or/hub-id")                # model + tokenizer (model.tokenizer is set)
    print(generate(model, tok, "ROMEO:", max_new_tokens=64, stop=["\n\n"]))   # greedy unless temperature>0
    chat = ChatSession(model, tok)                      # a conversation kept in the recurrent state

`leanseq lm race` trains a Mamba and a transformer on the same bytes with the same energy budget.
Names are imported on first use, so `python -m leanseq.text.corpus` runs without a double import.
"""

import importlib

_EXPORTS = {
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "StreamDecoder": "tokenizer",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_bpe": "tokenizer",
    "CorpusMissingError": "corpus", "corpus_dir": "corpus", "load_corpus": "corpus",
    "load": "pipeline", "generate": "pipeline", "stream_text": "pipeline", "stream_batch": "pipeline",
    "StopStrings": "pipeline", "ChatSession": "chat",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"leanseq.text.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'leanseq.text' has no attribute {name!r}")


__all__ = [  # noqa: RUF022 (grouped by module, as _EXPORTS)
    "ByteTokenizer", "HFTokenizer", "StreamDecoder", "Tokenizer", "load_tokenizer", "train_bpe",
    "CorpusMissingError", "corpus_dir", "load_corpus",
    "load", "generate", "stream_text", "stream_batch", "StopStrings", "ChatSession",
]
