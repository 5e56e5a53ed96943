"""Training: one trainer for every leanseq model, configured by TOML, resumable, data-parallel under torchrun."""

from leanseq.train.checkpoint import TrainCheckpointError, load_train_state, save_train_state
from leanseq.train.config import MODEL_KEY_ALIASES, OutputSection, RunConfig, TrainSection, load_config
from leanseq.train.lock import OutputDirBusyError, OutputDirLock
from leanseq.train.trainer import Trainer, build_model, build_trainer, lr_schedule, run

__all__ = [
    "MODEL_KEY_ALIASES",
    "OutputDirBusyError",
    "OutputDirLock",
    "OutputSection",
    "RunConfig",
    "TrainCheckpointError",
    "TrainSection",
    "Trainer",
    "build_model",
    "build_trainer",
    "load_config",
    "load_train_state",
    "lr_schedule",
    "run",
    "save_train_state",
]
