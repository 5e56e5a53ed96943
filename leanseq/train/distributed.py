"""Data-parallel setup for runs started by `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA).

Every rank draws the same global batch from the same seeded task stream and keeps its own rows, so the
data a run sees depends only on the seed and the global batch size, never on the number of ranks: a run
on N ranks follows the single-process run with the same global batch up to float summation order.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    """The process group this process belongs to (or a single-process DistInfo)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def init_from_env(device: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    Without those variables (a plain `leanseq train`) this is a no-op returning a single-process DistInfo.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            # every rank arrives before any tears the group down: a gloo peer destroyed mid-exchange aborts the
            # others at exit ("terminate called without an active exception"); bounded, so a dead peer cannot hang us
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is gone already: nothing left to wait for
        finally:
            dist.destroy_process_group()
