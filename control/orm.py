"""Database rows. Every resource row carries its organisation; the database is the source of truth for job state.

Each table has an integer `seq` primary key (insertion order, used for cursor pagination and event order) and a
public prefixed `id`. Schema changes go through Alembic only (`migrations/`); a test checks the two agree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from control.ids import now


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # Per-organisation limits; None: the deployment's default from settings (api.quotas).
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    inference_rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The base models (catalog or registered ids) the organisation may use; None: every one (control.models).
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class RegisteredModel(Base):
    """A base model the operator registered from a transformers directory on shared storage (control.models): used
    like a catalog entry, loaded from `path`. What registration found there is kept, so that checking a job or
    listing models never reads the directory again."""

    __tablename__ = "registered_models"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(200), unique=True)  # the public model id
    path: Mapped[str] = mapped_column(String(1024))
    model_type: Mapped[str] = mapped_column(String(64))  # transformers' config.model_type
    tasks: Mapped[list[str]] = mapped_column(JSON)  # causal_lm and/or classification
    parameters: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(16))  # as safetensors names it: F32, BF16, ...
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key; the key is shown once
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    num_examples: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    model: Mapped[str] = mapped_column(String(255))
    task: Mapped[str] = mapped_column(String(32))  # classification | causal_lm, from the training file's format
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    # OpenAI's method type: "supervised", or "dpo" (a preference-format training file; beta in `hyperparameters`)
    method_type: Mapped[str] = mapped_column(String(16), default="supervised", server_default="supervised")
    # What was asked for ("auto" kept as is), and what it resolved to once training started.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    adapter: Mapped[dict[str, Any]] = mapped_column(JSON)
    resolved_hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    resolved_adapter: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # adapter type "auto": which method won on the job's data, and every candidate's score (neat_core.train.select)
    adapter_selection: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(400), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    artifact_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    result_file: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the results CSV's file id
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The worker training the job holds a lease it renews by heartbeat; once it expires a reaper requeues the job.
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # unix time, seconds
    # When the job's task message was last sent. A queued job whose message is older than `redeliver_seconds` is
    # sent again (the broker may have lost it, or the API could not send it): a duplicate is harmless, the claim is
    # conditional, so the job still runs once.
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # unix time, seconds
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class JobAttempt(Base):
    """One claim of a job by one worker: the history that shows no two workers ever held a job at once."""

    __tablename__ = "job_attempts"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[float] = mapped_column(Float)
    # Its last fenced write (control.jobs): the claim, a heartbeat, an event, a checkpoint row, the outcome. Nothing
    # of the attempt can land after it once its lease is gone, so a lost attempt ended here.
    last_write_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # its outcome's write, or its last write
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)  # succeeded|failed|cancelled|released|lost
    # A lost attempt's point: the job's last checkpoint step when it was lost (None: none yet). The same point N
    # times in a row makes a poison job (control.jobs.expire).
    checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)


class IdempotencyKey(Base):
    """A POST's Idempotency-Key, its request's hash, and once done the response to replay (api.idempotency)."""

    __tablename__ = "idempotency_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # in_flight | done
    # While in flight: the API process handling it (control.processes), so that a retry after that process died
    # takes the key over at once instead of waiting out `STALE_SECONDS`.
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("organization_id", "endpoint", "key", name="uq_idempotency_key"),)


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    pruned: Mapped[bool] = mapped_column(Boolean, default=False)  # its directory was rotated away on disk


class WebhookEndpoint(Base):
    """Where an organisation wants its events sent (control.webhooks). The signing secret is kept as is: every
    delivery is signed with it (HMAC), so it cannot be stored as a one-way hash like an API key."""

    __tablename__ = "webhook_endpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))  # whsec_<base64 of the key>
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """One event for one endpoint: the message sent, signed afresh at each attempt, until a 2xx answers or the
    attempts run out. Its `id` is the Standard Webhooks `webhook-id`, the same on every retry."""

    __tablename__ = "webhook_deliveries"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the exact bytes signed and sent (UTF-8 JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; while one is in flight, when it counts as lost (its message is then sent again).
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class WebhookAttempt(Base):
    """One HTTP request of a delivery, as the organisation sees it at /v1/webhook_endpoints/{id}/deliveries."""

    __tablename__ = "webhook_attempts"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: no HTTP answer
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it failed, when it did
