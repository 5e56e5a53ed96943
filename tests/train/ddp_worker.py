"""Worker for test_ddp.py: one rank of a 2-process gloo run on 127.0.0.1, joined the way torchrun does it
(environment variables), which then dumps its final weights and losses for the test to compare."""

import os

import torch


def worker(rank: int, world_size: int, port: int, overrides: list[str], out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    from leanseq.train import build_trainer, distributed, load_config

    info = distributed.init_from_env("cpu")
    assert info.world_size == world_size and info.rank == rank
    try:
        trainer = build_trainer(load_config(None, overrides))
        trainer.fit()
        torch.save({"weights": trainer.model.state_dict(), "losses": trainer.losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def busy_worker(rank: int, world_size: int, port: int, overrides: list[str], out_dir: str) -> None:
    """A rank of a run whose output folder another process has locked: every rank must fail, none hang."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    from leanseq.train import OutputDirBusyError, build_trainer, distributed, load_config

    distributed.init_from_env("cpu")
    try:
        trainer = build_trainer(load_config(None, overrides))
        try:
            trainer.fit()
            outcome = "ran"
        except OutputDirBusyError as exc:
            outcome = str(exc)
        with open(os.path.join(out_dir, f"busy{rank}.txt"), "w") as fh:
            fh.write(outcome)
    finally:
        distributed.shutdown()
