"""leanseq: lean sequence models (Mamba, Mamba-2, a transformer baseline) for CPUs and edge devices."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a checkpoint directory (config.json + safetensors) into a leanseq model in eval mode."""
    from leanseq.models import load as _load

    return _load(path, **kwargs)


def load_tokenizer(path):
    """The tokenizer saved beside a checkpoint (tokenizer.json, or leanseq's byte tokenizer); see leanseq.text."""
    from leanseq.text.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


__all__ = ["__version__", "load", "load_tokenizer"]
