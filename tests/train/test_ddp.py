import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leanseq.train import build_trainer, load_config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out_dir: Path) -> list[str]:
    return [
        "model.family=mamba", "model.d_model=16", "model.n_layers=1", "model.state_size=4",
        "task.name=induction_heads", "task.seq_len=16",
        "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.lr=1e-2", "train.grad_clip=0.5",
        "train.eval_interval=0", "train.eval_batches=1", "train.eval_batch_size=4",
        f"output.dir={json.dumps(str(out_dir))}", "output.progress=false", "output.save_model=false",
    ]


def test_two_gloo_ranks_match_a_single_process_run_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned ranks import the worker by name
    import ddp_worker

    assert "ddp_worker" in sys.modules
    mp.spawn(ddp_worker.worker, args=(2, _free_port(), _overrides(tmp_path / "ddp"), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = build_trainer(load_config(None, _overrides(tmp_path / "single")))
    single.fit()

    for key, value in single.model.state_dict().items():
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key  # ranks stay in lockstep
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-5, atol=1e-6)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the global one on every rank
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the checkpoint; it resumes a single-process run
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()


def test_every_rank_fails_at_once_when_the_output_folder_is_locked(tmp_path, monkeypatch):
    from leanseq.train import OutputDirLock

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import ddp_worker

    lock = OutputDirLock(tmp_path / "ddp")
    lock.acquire()  # another run holds the folder
    try:
        mp.spawn(ddp_worker.busy_worker, args=(2, _free_port(), _overrides(tmp_path / "ddp"), str(tmp_path)),
                 nprocs=2, join=True)
    finally:
        lock.release()
    outcomes = [(tmp_path / f"busy{r}.txt").read_text() for r in range(2)]
    assert "is in use by another training run" in outcomes[0]
    assert outcomes[1].startswith("rank 0: output folder") and "is in use" in outcomes[1]
    assert not (tmp_path / "ddp" / "checkpoint.pt").exists()
