"""`TrainSpec`: what a training run is asked to do (the boundary type the worker fills in), and the rules that
turn its "auto" values into concrete ones for a given method, model and dataset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neat_core.errors import InvalidHyperparameterError
from neat_core.memory import auto_batch_size, auto_max_seq_len
from neat_core.methods import AUTO

# Aim for roughly this many example presentations in total, within [1, 10] epochs: small files get more passes,
# large ones a single pass (OpenAI's "auto" behaves the same way).
TARGET_EXAMPLES_SEEN = 4000
MAX_AUTO_EPOCHS = 10
OBJECTIVES = ("supervised", "dpo")  # OpenAI's method types we train
AUTO_BETA = 0.1  # DPO's beta under "auto": the DPO paper's and trl's default


@dataclass
class TrainSpec:
    base_model: str  # catalog id or local transformers directory (or a registered model's id, with base_model_dir)
    training_file: Path  # JSONL in one of neat_core.data's formats
    output_dir: Path  # gets checkpoints/ and adapter/ (`checkpoint_dir`, `adapter_dir`)
    validation_file: Path | None = None
    method: str = "neat"
    objective: str = "supervised"  # "supervised", or "dpo" on a preference-format file (neat_core.train.dpo)
    beta: float | str = AUTO  # DPO's beta; "supervised" ignores it and refuses a value (resolve_beta)
    adapter: dict[str, Any] = field(default_factory=dict)  # method hyperparameters (peft names), "auto" allowed
    n_epochs: int | str = AUTO
    batch_size: int | str = AUTO
    learning_rate_multiplier: float | str = AUTO
    max_seq_len: int | str = AUTO
    # Activation checkpointing: "auto" turns it on for bases of CHECKPOINTING_MIN_PARAMETERS or more
    # (neat_core.memory.resolve_gradient_checkpointing); it changes memory and time, never the numbers.
    gradient_checkpointing: bool | str = AUTO
    # The frozen base's dtype: "auto" is bf16 on GPUs that support it, fp32 elsewhere (neat_core.devices.
    # base_weights_dtype); "float32" / "bfloat16" force one. Adapters train in fp32 either way.
    base_dtype: str = AUTO
    # Data-parallel processes (neat_core.train.distributed): one per GPU, or gloo processes on the CPU. The global
    # batch is the same as one process's; each takes batch_size / n_devices of its rows.
    n_devices: int = 1
    max_steps: int | None = None  # hard cap on optimiser steps (demos, tests)
    seed: int = 0
    checkpoint_every: int | None = None  # in steps; None: at the end of every epoch
    keep_checkpoints: int | None = 3
    device: str = "auto"
    cache_dir: Path | None = None  # where converted catalog models live
    base_model_dir: Path | None = None  # a registered base model's directory: its weights, under `base_model`'s name
    resume_from: Path | None = None  # a checkpoint directory to continue from

    @property
    def checkpoint_dir(self) -> Path:
        """Where the run's checkpoints go (`latest_checkpoint(spec.checkpoint_dir)` finds one to resume from)."""
        return self.output_dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        """Where a finished run's artifact goes (`TrainResult.adapter_dir`)."""
        return self.output_dir / "adapter"


@dataclass(frozen=True)
class Schedule:
    """The resolved training hyperparameters (reported back to the user as is)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    max_seq_len: int
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidHyperparameterError(name, f"invalid value {value!r}", f"'auto' or an integer {low}..{high}")
    return value


def resolve_beta(spec: TrainSpec) -> float | None:
    """DPO's beta (None for supervised runs, which refuse a value: never accepted and ignored). OpenAI's bounds:
    0 < beta <= 2."""
    if spec.objective not in OBJECTIVES:
        raise InvalidHyperparameterError("objective", f"unknown objective {spec.objective!r}", list(OBJECTIVES))
    if spec.objective != "dpo":
        if spec.beta != AUTO:
            raise InvalidHyperparameterError("beta", "beta is a DPO hyperparameter", "'auto' for supervised runs")
        return None
    beta = AUTO_BETA if spec.beta == AUTO else spec.beta
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= 2:
        raise InvalidHyperparameterError("beta", f"invalid value {beta!r}", "'auto' or 0 < x <= 2")
    return float(beta)


def resolve_schedule(spec: TrainSpec, *, task: str, n_examples: int, base_learning_rate: float) -> Schedule:
    batch_size = (  # the "auto" rules live with the memory estimate, which the worker checks before any torch
        auto_batch_size(task, n_examples)
        if spec.batch_size == AUTO
        else _check_int("batch_size", spec.batch_size, 1, 1024)
    )
    n_epochs = (
        max(1, min(MAX_AUTO_EPOCHS, math.ceil(TARGET_EXAMPLES_SEEN / n_examples)))
        if spec.n_epochs == AUTO
        else _check_int("n_epochs", spec.n_epochs, 1, 100)
    )
    multiplier = spec.learning_rate_multiplier
    if multiplier == AUTO:
        multiplier = 1.0
    elif isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not 0 < multiplier <= 100:
        raise InvalidHyperparameterError(
            "learning_rate_multiplier", f"invalid value {multiplier!r}", "'auto' or 0 < x <= 100"
        )
    max_seq_len = (
        auto_max_seq_len(task) if spec.max_seq_len == AUTO else _check_int("max_seq_len", spec.max_seq_len, 8, 32768)
    )
    if spec.max_steps is not None:
        _check_int("max_steps", spec.max_steps, 1, 10_000_000)
    steps_per_epoch = math.ceil(n_examples / batch_size)
    total_steps = n_epochs * steps_per_epoch
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    return Schedule(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=float(multiplier),
        learning_rate=base_learning_rate * float(multiplier),
        max_seq_len=max_seq_len,
        warmup_steps=max(1, round(0.06 * total_steps)),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
