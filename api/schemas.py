"""Request bodies and public objects (OpenAI's shapes, plus our `adapter` extension)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from control.jobs import JobStatus, fine_tuned_model_name
from control.orm import Checkpoint, File, Job, JobEvent, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from control.protocol import invalid_field, refuse_unless_neutral
from control.queue import MAX_DEVICES
from control.webhooks import EVENT_TYPES, secret_hint

Auto = Literal["auto"]

# Bounds on what a job spec may hold (docs/operations.md, "Job spec limits"): checked while the body is parsed, so a
# spec over one is refused with a 400 naming the field and the limit before anything (an idempotency key, a job) is
# written, and before a method's own checks see it (which quote a bad value back).
MAX_MODEL_ID = 255
MAX_FILE_ID = 64
MAX_SUFFIX = 40
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's
MAX_ADAPTER_TYPE = 64
MAX_ADAPTER_FIELDS = 32  # hyperparameters in `adapter`, besides `type`
MAX_LIST_ENTRIES = 256  # in any list in `adapter` (target_modules: module names, patterns or full paths)
MAX_STRING = 256  # characters of any string in `adapter`
MAX_DEPTH = 3  # nesting of lists and objects in an `adapter` hyperparameter


def _too_big(what: str, limit: int, got: int) -> PydanticCustomError:
    return PydanticCustomError(
        "too_big", "at most {limit} {what}, got {got}", {"limit": limit, "what": what, "got": got}
    )


def _bounded(value: Any, depth: int = 0) -> Any:
    """Any JSON value an adapter hyperparameter may hold, refused once it is bigger than the bounds above (its
    shape is the method's business: neat_core's specs check it next)."""
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise _too_big("characters in a string", MAX_STRING, len(value))
    if isinstance(value, list | dict):
        if depth >= MAX_DEPTH:
            raise _too_big("levels of nesting", MAX_DEPTH, depth + 1)
        if len(value) > MAX_LIST_ENTRIES:
            raise _too_big("entries", MAX_LIST_ENTRIES, len(value))
        for item in value.values() if isinstance(value, dict) else value:
            _bounded(item, depth + 1)
        for key in value if isinstance(value, dict) else ():
            _bounded(key, depth + 1)
    return value


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # OpenAI's bounds (its create-job spec): n_epochs 1..50, batch_size 1..256, learning_rate_multiplier > 0
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    # NaN and ±inf are refused as such ("finite number"): NaN would otherwise fail `le` with a baffling message
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = "auto"
    # Ours: activation checkpointing (docs/benchmarks.md, "Activation checkpointing"); "auto" turns it on for base
    # models of 1B parameters or more. Strictly a boolean: "yes" or 1 is refused, not read as true.
    gradient_checkpointing: Auto | StrictBool = "auto"
    # Ours: data-parallel training on this many devices (docs/operations.md, "Multi-device jobs"); the job waits for
    # a worker that has them. Strictly an integer: "2" or 2.0 is refused.
    n_devices: Annotated[StrictInt, Field(ge=1, le=MAX_DEVICES)] = 1


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    # OpenAI's bounds: 0 < beta <= 2 (neat_core.train.spec.resolve_beta checks the same; "auto" is 0.1 there)
    beta: Auto | Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)] = "auto"


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # OpenAI's other type (reinforcement) is refused by name (400 `unsupported_parameter`), never taken for another.
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Any = None

    @field_validator("type")
    @classmethod
    def _trained_types(cls, value: str) -> str:
        return refuse_unless_neutral(f"method type '{value}'", value, ("supervised", "dpo"))

    @field_validator("reinforcement", mode="before")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_neutral(f"method.{info.field_name}", value, ())

    @model_validator(mode="after")
    def _settings_of_its_own_type(self) -> Method:
        # a type's settings under another type would be silently ignored: refused, naming them
        for kind in ("supervised", "dpo"):
            if getattr(self, kind) is not None and self.type != kind:
                raise invalid_field(f"method.{kind}", f"given with method type '{self.type}'; it belongs to "
                                    f"method type '{kind}'")  # fmt: skip
        return self

    def hyperparameters(self) -> Hyperparameters | None:
        """The hyperparameters given under the method's own type, if any."""
        settings = getattr(self, self.type)
        return settings.hyperparameters if settings is not None else None


class Adapter(BaseModel):
    """`type` plus the method's own hyperparameters (peft's names), checked against neat_core's specs."""

    model_config = ConfigDict(extra="allow")
    # each extra field (a hyperparameter) is bounded on its own, so that an error names it: adapter.target_modules
    __pydantic_extra__: dict[str, Annotated[Any, BeforeValidator(_bounded)]] = Field(init=False)
    type: Annotated[str, Field(min_length=1, max_length=MAX_ADAPTER_TYPE)] = "neat"

    @model_validator(mode="before")
    @classmethod
    def _few_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) - ("type" in data) > MAX_ADAPTER_FIELDS:
            raise _too_big("hyperparameters", MAX_ADAPTER_FIELDS, len(data) - ("type" in data))
        return data


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_ID)]
    training_file: Annotated[str, Field(min_length=1, max_length=MAX_FILE_ID)]
    validation_file: Annotated[str, Field(min_length=1, max_length=MAX_FILE_ID)] | None = None
    suffix: Annotated[str, Field(max_length=MAX_SUFFIX, pattern=r"^[A-Za-z0-9_-]*$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                             Annotated[str, Field(max_length=MAX_METADATA_VALUE)]],
                        Field(max_length=MAX_METADATA_PAIRS)] | None = None  # fmt: skip
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's legacy top-level form
    adapter: Adapter | None = None
    integrations: Any = None  # OpenAI's (Weights & Biases): refused unless empty

    @field_validator("integrations", mode="before")
    @classmethod
    def _no_integrations(cls, value: Any) -> Any:
        return refuse_unless_neutral("integrations", value, ([],))

    @model_validator(mode="after")
    def _legacy_hyperparameters_are_supervised(self) -> JobCreate:
        # OpenAI's top-level `hyperparameters` is deprecated and supervised-only: with a dpo method a value there
        # would be neither honoured nor a DPO setting; all-"auto" asks for nothing and passes.
        legacy = self.hyperparameters.model_dump() if self.hyperparameters else None
        if self.method_type != "supervised" and legacy not in (None, Hyperparameters().model_dump()):
            raise invalid_field("hyperparameters", f"the top-level hyperparameters apply to supervised jobs only; "
                                f"give them in method.{self.method_type}.hyperparameters")  # fmt: skip
        return self

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def requested_hyperparameters(self) -> dict[str, Any]:
        """What the job's row keeps: its method's hyperparameters ("auto" kept as is; a dpo job's include beta)."""
        given = self.method.hyperparameters() if self.method else None
        if self.method_type == "dpo":
            values = (given or DpoHyperparameters()).model_dump()
        else:
            values = (given or self.hyperparameters or Hyperparameters()).model_dump()
        if values["gradient_checkpointing"] == "auto":  # ours, not OpenAI's: on the row (and echoed) only when given
            del values["gradient_checkpointing"]
        if values["n_devices"] == 1:  # likewise: on the row (and echoed) only when more than one
            del values["n_devices"]
        return values


def page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more}


def files_page(data: list[dict], has_more: bool) -> dict:
    """The files list also names its first and last ids (null when empty), as OpenAI's does."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {**page(data, has_more), "first_id": first, "last_id": last}


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",  # `status_details` (deprecated, a string when present) has nothing to say
        "format": row.format,
        "num_examples": row.num_examples,
        "sha256": row.sha256,
    }


# The internal states OpenAI's status enum lacks, as the public status shows them: a job asked to cancel is still
# running until its worker ends the step it is on (then it is cancelled; or succeeded, when that was the last step).
# A job asked to pause is likewise running until it has saved its checkpoint; then it is `paused`, the status
# OpenAI's pause answers with (its SDK's enum predates pause).
PUBLIC_STATUS = {JobStatus.CANCELLING: JobStatus.RUNNING, JobStatus.PAUSING: JobStatus.RUNNING}


def columns(model: Any, names: tuple[str, ...]) -> list[Any]:
    """`model`'s columns `names`, each labelled with its attribute's name: a Core row of them reads like the ORM
    object (`row.user_metadata`) in the `*_object` functions below."""
    return [getattr(model, name).label(name) for name in names]


# What job_object reads: the hot reads (api.routes.jobs) select these columns, not the whole ORM row.
JOB_FIELDS = ("id", "created_at", "finished_at", "estimated_finish", "model", "fine_tuned_model", "organization_id",
              "status", "error", "hyperparameters", "resolved_hyperparameters", "method_type", "adapter",
              "resolved_adapter", "adapter_selection", "training_file", "validation_file", "result_file",
              "trained_tokens", "seed", "user_metadata", "suffix")  # fmt: skip


def job_object(row: Job) -> dict[str, Any]:
    hyperparameters = row.resolved_hyperparameters or row.hyperparameters
    kind = row.method_type
    # OpenAI's top-level `hyperparameters` (deprecated) has the schedule only; a dpo job's beta is in its method
    schedule = {k: v for k, v in hyperparameters.items() if k != "beta"}
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "estimated_finish": row.estimated_finish,
        "model": row.model,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.organization_id,
        "status": PUBLIC_STATUS.get(row.status, row.status),
        "error": row.error,
        "hyperparameters": schedule,
        "method": {"type": kind, kind: {"hyperparameters": hyperparameters}},
        "adapter": row.resolved_adapter or row.adapter,  # "auto": the chosen method's, once training started
        "adapter_selection": row.adapter_selection,  # ours: "auto"'s choice and candidates; null otherwise
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "result_files": [row.result_file] if row.result_file else [],
        "trained_tokens": row.trained_tokens,
        "seed": row.seed,
        "metadata": row.user_metadata,
        "user_provided_suffix": row.suffix,
        "integrations": [],
    }


EVENT_FIELDS = ("id", "created_at", "level", "message", "type", "data")  # what event_object reads


def event_object(row: JobEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data if row.data is not None else {},  # an object in OpenAI's spec, never null
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


# --- webhook endpoints (OpenAI's /v1/webhook_endpoints shapes; control.webhooks) --------------------------------

MAX_WEBHOOK_NAME, MAX_WEBHOOK_URL = 200, 2048
WebhookEventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_NAME)]
    url: Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_URL)]
    event_types: Annotated[list[WebhookEventType], Field(min_length=1)]


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_NAME)] | None = None
    url: Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_URL)] | None = None
    event_types: Annotated[list[WebhookEventType], Field(min_length=1)] | None = None


def webhook_endpoint_object(row: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    """OpenAI's `WebhookEndpoint`; `with_secret`: its `WebhookEndpointWithSecret`, answered once, at creation."""
    body = {
        "id": row.id,
        "object": "webhook_endpoint",
        "name": row.name,
        "url": row.url,
        "event_types": list(row.event_types),
        "signing_secret_hint": secret_hint(row.secret),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
    return {**body, "signing_secret": row.secret} if with_secret else body


def webhook_delivery_object(row: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    """Ours (OpenAI lists no deliveries): one event sent to one endpoint, and each of its HTTP attempts."""
    return {
        "id": row.id,
        "object": "webhook_delivery",
        "endpoint_id": row.endpoint_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "status": row.status,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "next_attempt_at": None if row.next_attempt_at is None else int(row.next_attempt_at),
        "attempts": [
            {
                "attempt": a.attempt,
                "started_at": int(a.started_at),
                "duration_ms": a.duration_ms,
                "status_code": a.status_code,
                "error": a.error,
            }
            for a in attempts
        ],  # fmt: skip
    }
