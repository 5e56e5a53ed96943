"""leanseq: lean sequence models (Mamba, Mamba-2, a transformer baseline) for CPUs and edge devices."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a checkpoint directory (config.json + safetensors) into a leanseq model in eval mode."""
    from leanseq.models import load as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load"]
