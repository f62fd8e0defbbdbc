"""Training: configuration, the training loop, and checkpoints (safetensors + JSON, no pickles)."""

from __future__ import annotations

from scalex_scale.train.checkpoint import (
    FORMAT_VERSION,
    check_resumable,
    load_checkpoint,
    load_trainer_state,
    model_id,
    read_model_config,
    save_checkpoint,
)
from scalex_scale.train.config import TrainConfig, cpu_has_bf16, resolve_device
from scalex_scale.train.trainer import (
    EpochLoader,
    EpochRecord,
    Trainer,
    TrainerState,
    TrainResult,
    all_reduce_epoch_loss,
)

__all__ = [
    "FORMAT_VERSION",
    "EpochLoader",
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerState",
    "all_reduce_epoch_loss",
    "check_resumable",
    "cpu_has_bf16",
    "load_checkpoint",
    "load_trainer_state",
    "model_id",
    "read_model_config",
    "save_checkpoint",
    "resolve_device",
]
