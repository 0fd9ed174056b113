"""Training callbacks: progress reporting and cancellation. They observe and may ask the loop to stop; they never
change what the loop computes (the transformers `TrainerCallback` idea, reduced to what we use)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from neat_core.train.checkpoint import LoopState


class Callback:
    """Override what you need; every hook is optional."""

    def on_train_begin(self, loop: LoopState, info: dict[str, Any]) -> None:
        """`info`: resolved hyperparameters, step counts, parameter counts."""

    def on_step_end(self, loop: LoopState, metrics: dict[str, float]) -> None:
        """After every optimiser step; `metrics` has train_loss, learning_rate and a train accuracy."""

    def on_evaluate(self, loop: LoopState, metrics: dict[str, float]) -> None:
        """After a validation pass (full_valid_loss, full_valid_accuracy or full_valid_mean_token_accuracy)."""

    def on_epoch_end(self, loop: LoopState, metrics: dict[str, float]) -> None:
        """After the last batch of an epoch (`loop.epoch` is the epoch just finished)."""

    def before_save(self, loop: LoopState, what: str) -> None:
        """Before the loop writes a checkpoint (`what` = "checkpoint") or the finished adapter ("artifact"). A
        caller that may no longer write anything (it lost the job to another process) raises here: the exception
        leaves `train` and nothing is written."""

    def on_checkpoint(self, loop: LoopState, path: Path, metrics: dict[str, float]) -> None:
        """After a checkpoint directory is complete on disk."""

    def should_stop(self, loop: LoopState) -> bool:
        """Checked after every step; True makes the loop save a checkpoint and return as cancelled."""
        return False

    def on_selection(self, report: dict[str, Any]) -> None:
        """Method "auto" only: once the method is chosen, before the winner trains (`TrainResult.selection` has
        the report's shape; neat_core.train.select). Candidate runs call no other hook but `should_stop`."""


class CancelFlag(Callback):
    """Thread-safe cancellation: any thread calls `cancel()`, the loop stops after its current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def should_stop(self, loop: LoopState) -> bool:
        return self._event.is_set()


class StopAtStep(Callback):
    """Stop once `step` optimiser steps are done (tests and demos interrupt runs with it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def should_stop(self, loop: LoopState) -> bool:
        return loop.step >= self.step
