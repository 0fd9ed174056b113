"""Training: spec, loop, callbacks, checkpoints."""

from neat_core.train.callbacks import Callback, CancelFlag, StopAtStep
from neat_core.train.checkpoint import latest_checkpoint, list_checkpoints
from neat_core.train.loop import TrainResult, evaluate, train
from neat_core.train.spec import Schedule, TrainSpec, resolve_schedule

__all__ = [
    "Callback",
    "CancelFlag",
    "Schedule",
    "StopAtStep",
    "TrainResult",
    "TrainSpec",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_schedule",
    "train",
]
