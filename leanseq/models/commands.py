"""Helpers for commands that run a checkpoint. `leanseq generate` and `leanseq chat` live in the text room
(leanseq/text/commands.py): they need a tokenizer, which the model room does not import."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_checkpoint(name: str = "tiny-mamba") -> Path:
    """Path of a checkpoint shipped inside the package (leanseq/data/<name>)."""
    path = Path(str(resources.files("leanseq") / "data" / name))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no bundled checkpoint {name!r} in {path.parent}")
    return path


def register(subparsers) -> None:
    """Nothing to register: kept in cli.COMMAND_MODULES for the model room's future commands."""
