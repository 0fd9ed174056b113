"""Training: spec, loop, callbacks, checkpoints."""

from neat_core.train.callbacks import Callback, CancelFlag, StopAtStep
from neat_core.train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints
from neat_core.train.loop import TrainResult, evaluate, train
from neat_core.train.spec import Schedule, TrainSpec, resolve_schedule

__all__ = [
    "Callback",
    "CancelFlag",
    "Schedule",
    "StopAtStep",
    "TrainResult",
    "TrainSpec",
    "checkpoint_step",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_schedule",
    "train",
]
