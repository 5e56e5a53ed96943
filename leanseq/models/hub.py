"""Hugging Face Hub ids (`state-spaces/mamba-130m-hf`) resolved to a folder of the local Hugging Face cache.

Offline by default: the cache is read with `huggingface_hub` (snapshot_download(local_files_only=True)), and
nothing is downloaded unless HF_HUB_OFFLINE=0 is set explicitly. huggingface_hub is optional (transformers
depends on it); without it a Hub id gets an error saying what to install.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from leanseq.models.checkpoint import CheckpointError, _being_replaced

# owner/name as the Hub allows them (letters, digits, - _ .), optionally @revision
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]+)?$")
# files a leanseq checkpoint may need; anything else in the repo (other formats, README images) is skipped
WANTED = ["*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model"]


def cache_dir() -> Path:
    """The hub cache folder as huggingface_hub computes it, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _reappears(candidate: Path, misses: int = 20, limit_s: float = 5.0) -> bool:
    """Whether a missing `candidate` is a folder that another process is replacing (without an atomic exchange
    it is briefly absent between two renames): it shows up again while a writer's scratch copy is there (however
    long a loaded machine keeps that writer waiting, up to limit_s), or within `misses` checks ~5 ms apart."""
    deadline = time.monotonic() + limit_s
    missed = 0
    while missed < misses and time.monotonic() < deadline:
        if candidate.exists():
            return True
        missed = 0 if _being_replaced(candidate) else missed + 1
        time.sleep(0.005)
    return candidate.exists()


def resolve(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; a Hub id's snapshot folder from the local cache; else a clear error."""
    candidate = Path(path)
    text = os.fspath(path)
    if candidate.exists() or _reappears(candidate):
        return candidate  # a local folder (perhaps mid-replacement: leanseq.load's reader handles that)
    if not HUB_ID.match(text) or text.startswith((".", "/")):
        raise CheckpointError(f"{text} does not exist: give a checkpoint folder (config.json + weights) or a "
                              "Hugging Face Hub id like state-spaces/mamba-130m-hf")
    repo_id, _, revision = text.partition("@")
    try:
        import huggingface_hub
    except ImportError as exc:
        raise CheckpointError(f"{text} is not a folder here; to read it as a Hugging Face Hub id from the local "
                              "cache, install huggingface_hub (pip install huggingface_hub)") from exc
    online = os.environ.get("HF_HUB_OFFLINE", "").strip() == "0"
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir(),
                                                   local_files_only=not online, allow_patterns=WANTED)
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, network errors, ...
        if online:
            raise CheckpointError(f"cannot download {text} from the Hugging Face Hub: {exc}") from exc
        raise CheckpointError(
            f"{text} is not a folder here and not in the local Hugging Face cache ({cache_dir()}); download it "
            f"first with `huggingface-cli download {repo_id}` (or `hf download {repo_id}`), or set HF_HUB_OFFLINE=0 "
            "to let leanseq download it") from exc
    return Path(folder)
