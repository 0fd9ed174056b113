"""Request bodies and public objects (OpenAI's shapes, plus our `adapter` extension)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control.jobs import fine_tuned_model_name
from control.orm import Checkpoint, File, Job, JobEvent

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | Annotated[int, Field(ge=1, le=100)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=1024)] = "auto"
    # NaN and ±inf are refused as such ("finite number"): NaN would otherwise fail `le` with a baffling message
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = "supervised"
    supervised: Supervised | None = None


class Adapter(BaseModel):
    """`type` plus the method's own hyperparameters (peft's names), checked against neat_core's specs."""

    model_config = ConfigDict(extra="allow")
    type: str = "neat"


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=255)]
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    suffix: Annotated[str, Field(max_length=40, pattern=r"^[A-Za-z0-9_-]*$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None  # fmt: skip
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's legacy top-level form
    adapter: Adapter | None = None

    def requested_hyperparameters(self) -> Hyperparameters:
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more}


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "format": row.format,
        "num_examples": row.num_examples,
        "sha256": row.sha256,
    }


def job_object(row: Job) -> dict[str, Any]:
    hyperparameters = row.resolved_hyperparameters or row.hyperparameters
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "estimated_finish": row.estimated_finish,
        "model": row.model,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.organization_id,
        "status": row.status,
        "error": row.error,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "adapter": row.resolved_adapter or row.adapter,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "result_files": [],
        "trained_tokens": row.trained_tokens,
        "seed": row.seed,
        "metadata": row.user_metadata,
        "user_provided_suffix": row.suffix,
        "integrations": [],
    }


def event_object(row: JobEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data,
    }


def checkpoint_object(row: Checkpoint, job: Job) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": row.created_at,
        "fine_tuning_job_id": job.id,
        "fine_tuned_model_checkpoint": f"{fine_tuned_model_name(job)}:ckpt-step-{row.step_number}",
        "step_number": row.step_number,
        "metrics": row.metrics,
    }
