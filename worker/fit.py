"""Does a job fit this worker's device? Checked right after the claim, before torch or the model is loaded: a job
whose estimated training memory (neat_core.memory.estimate_job_memory) exceeds the device's free memory fails at
once, with the estimate in its error, instead of loading a model to die of out-of-memory minutes later (or, on a
CPU worker, to push the machine into swap and the kernel's OOM killer, which takes the worker with it)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from control import jobs, models
from control.db import with_retries
from control.orm import File, Job
from control.settings import Settings
from neat_core.errors import InsufficientMemoryError
from neat_core.memory import MemoryEstimate, available_memory, estimate_job_memory, gib

log = logging.getLogger(__name__)


def check_fits(url: str, lease: jobs.Lease, settings: Settings) -> MemoryEstimate | None:
    """Raises InsufficientMemoryError when the job's estimate exceeds the device's memory; returns the estimate
    (None when the model's shape could not be read without loading it: the job then trains as before)."""
    if settings.device_memory_bytes is not None:
        where, free, gpu = "configured device memory (NEAT_DEVICE_MEMORY_BYTES)", settings.device_memory_bytes, False
    else:
        where, free, gpu = available_memory(settings.device)
    estimate = with_retries(url, lambda session: _estimate(session, lease.job_id, settings, gpu))
    if estimate is None:
        log.info("job %s: no memory estimate (the model's shape is unknown without loading it)", lease.job_id)
        return None
    if estimate.total > free:
        raise InsufficientMemoryError(
            f"The job needs an estimated {estimate.describe()}; this worker has {gib(free)} ({where}). Lower "
            "batch_size, or run it on a worker with more memory."
        )
    return estimate


def _estimate(session: Session, job_id: str, settings: Settings, gpu: bool) -> MemoryEstimate | None:
    job = session.scalar(select(Job).where(Job.id == job_id))
    training = session.scalar(select(File).where(File.id == job.training_file))
    if training is None or not training.num_examples:
        return None  # the file is gone: train_spec reports that, naming the file
    # bf16 base weights and autocast on a GPU (neat_core.devices), fp32 on a CPU; a GPU without bf16 (before
    # Ampere) runs fp32 and needs twice this, which its out-of-memory error then reports
    value_bytes = 2 if gpu else 4
    try:
        model = models.loads_from(session, job.model) or job.model  # a registered model's shape: its directory's
    except LookupError:
        return None  # removed: train_spec reports that
    return estimate_job_memory(
        model,
        task=job.task,
        n_examples=training.num_examples,
        mean_example_bytes=training.bytes / training.num_examples,
        batch_size=job.hyperparameters.get("batch_size", "auto"),
        preference_pairs=job.method_type == "dpo",
        adapter=job.adapter,
        gradient_checkpointing=job.hyperparameters.get("gradient_checkpointing", "auto"),
        dtype_bytes=value_bytes,
        activation_bytes=value_bytes,
        cache_dir=settings.model_cache_dir,
    )
