"""The one settings object: read from the environment once per process. No other module reads os.environ.

Embedded default (nothing set): SQLite, kombu's SQLAlchemy broker on SQLite, and artifacts, all under `data/`.
Distributed: set DATABASE_URL (Postgres), BROKER_URL (Redis) and NEAT_ARTIFACT_ROOT (a shared volume).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEAT_", extra="ignore")

    data_dir: Path = Path("data")
    database_url: str | None = Field(None, validation_alias=AliasChoices("NEAT_DATABASE_URL", "DATABASE_URL"))
    broker_url: str | None = Field(None, validation_alias=AliasChoices("NEAT_BROKER_URL", "BROKER_URL"))
    artifact_root: Path | None = None
    model_cache_dir: Path | None = None  # where neat_core keeps converted catalog models (default ~/.cache)

    host: str = "127.0.0.1"
    port: int = 8000
    bootstrap_api_key: str | None = None  # ensured to exist (for org `bootstrap_org`) at start
    bootstrap_org: str = "org-default"
    admin_api_key: str | None = None  # enables /v1/admin (organisations and keys); unset: those routes are 404
    # The Prometheus scrape credential (Bearer) of every tier's /metrics (control.metrics); unset: no /metrics.
    metrics_token: str | None = None
    # A training worker serves its /metrics on this port (0: not at all), gathered from its pool processes through
    # prometheus-client's multiprocess mode, which needs PROMETHEUS_MULTIPROC_DIR set (worker.metrics).
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"
    prometheus_multiproc_dir: Path | None = Field(None, validation_alias="PROMETHEUS_MULTIPROC_DIR")

    max_upload_bytes: int = 512 * 1024 * 1024
    # A base-model archive the operator uploads (control.models.register_archive): the upload, and what it unpacks to
    max_model_archive_bytes: int = 64 * 2**30
    # An inference request's JSON body (chat, completion, classification), refused with a 413 past it before it is
    # parsed; what fits is then bounded in characters (control.protocol) before anything is tokenized.
    max_inference_body_bytes: int = 32 * 1024 * 1024
    upload_idle_seconds: float = 300.0  # an upload that sends nothing for this long is cut off (408)
    # Temporary bytes (control.storage.sweep): an entry nobody wrote to for `temp_max_age_seconds` is abandoned
    # (it must exceed `upload_idle_seconds` and the longest single checkpoint or adapter write); every API and
    # worker process sweeps at start and every `sweep_seconds`.
    temp_max_age_seconds: float = 3600.0
    sweep_seconds: float = 600.0
    # Default per-organisation limits (each organisation may have its own: `python -m api.admin set-limits`).
    max_active_jobs: int = 20  # queued + running jobs
    max_storage_bytes: int = 50 * 1024**3  # all files together
    key_cache_seconds: float = 5.0  # how long a valid key is remembered per API process (0: look up every time)
    inference_rpm: int = 600  # inference requests per minute, per API process
    max_line_bytes: int = 4 * 1024 * 1024
    min_examples: int = 10
    max_job_seconds: int = 24 * 3600  # the broker's visibility timeout must exceed the longest job
    checkpoint_every: int | None = None  # steps; None: every epoch
    device: str = "auto"  # training and serving device for this process
    # The devices a training worker offers a job (NEAT_WORKER_DEVICES): GPUs, or CPU processes on a CPU worker. It
    # takes jobs of 1..worker_devices devices (their queues: control.queue.training_queue); a job asking for more
    # waits, queued, for a worker that has them.
    worker_devices: int = 1
    # Bytes of device memory a training job may plan on (worker.fit refuses, at claim, a job whose estimate exceeds
    # it). None: measured at each claim, the GPU's free memory or else the machine's available RAM. Set it lower to
    # keep room for other processes on the device.
    device_memory_bytes: int | None = None
    serving: bool = True  # host the inference loop in this (API) process
    serving_max_models: int = 2  # whole models kept for adapters that cannot be batched (each a base copy)
    serving_cache_mb: int = 1024  # adapter factors kept per base model (least recently used evicted first)
    # Keys and values of prompt beginnings kept per engine, so a prompt starting like an earlier one (a system prompt,
    # few-shot examples) prefills only the rest (neat_core.serving.prefix); 0 turns it off.
    serving_prefix_cache_mb: int = 64
    serving_max_batch: int = 32  # rows per forward pass
    serving_pass_tokens: int = 512  # token positions per classification pass: the longest wait a pass can impose
    serving_lanes: int = 2  # classification passes of different organisations that run at once
    serving_reserved_rows: int = 4  # generation rows of a batch no one organisation may hold (room for others)
    serving_max_queued_per_org: int = 8192  # rows one organisation may have waiting in an engine (then 429)
    serving_batch_window_ms: float = 5.0  # how long an idle engine waits for company before it starts a batch
    serving_preload: str = ""  # comma-separated model ids (fine-tuned or base) loaded at start
    # The inference tier. Empty `inference_servers`: the embedded launcher serves in its own process; otherwise
    # the API sends inference to these servers (comma-separated base URLs), of kind `ours` (`python -m inference`)
    # or `vllm` (started with --enable-lora). Listed, not registered: see docs/serving.md.
    inference_servers: str = ""
    inference_server_kind: Literal["ours", "vllm"] = "ours"
    # llama.cpp's llama-servers (comma-separated base URLs), each started with a base model and adapters as GGUFs
    # (`python -m inference.gguf`): asked first for what they hold and can honour; the rest goes where the settings
    # above send it (api.llamacpp).
    llamacpp_servers: str = ""
    llamacpp_dir: str = ".llamacpp"  # llama.cpp's build and source tree (scripts/llamacpp/build.sh), for the converter
    internal_token: str | None = None  # the shared secret between the API and inference servers (Bearer)
    inference_connect_timeout_s: float = 3.0  # an unreachable server is skipped after this long
    inference_timeout_s: float = 600.0  # the longest wait for a server's next bytes (a whole non-streamed answer)
    inference_host: str = "127.0.0.1"  # where `python -m inference` listens
    inference_port: int = 8001
    queue: str = "training"
    # Worker leases: a training worker renews its job's lease every `heartbeat_seconds`; a job whose lease is
    # older than `lease_seconds` is requeued by any worker's reaper (every `reaper_seconds`) after a backoff
    # (`retry_backoff_seconds`, doubling with each loss at the same point, at most `retry_backoff_max_seconds`);
    # it fails (`worker_lost`) only once `max_attempts` attempts in a row were lost at the same point (the same
    # last checkpoint: a poison job). Losses between which the job made progress never fail it.
    lease_seconds: float = 60.0
    # Postgres ends a session that sits idle inside a transaction this long (`idle_in_transaction_session_timeout`),
    # releasing its row locks: a worker paused (SIGSTOP) mid-transaction would otherwise hold its job row locked and
    # block the reaper and the job's next owner for as long as it stays paused. None: `lease_seconds`, so the lock
    # is gone by the time the lease has run out; 0: never. Every transaction of ours is a few statements long.
    db_idle_transaction_seconds: float | None = None
    heartbeat_seconds: float = 10.0
    reaper_seconds: float = 15.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 5.0
    retry_backoff_max_seconds: float = 300.0
    redeliver_seconds: float = 600.0  # a job queued this long since its message was sent gets it sent again
    # Webhooks (control.webhooks, docs/webhooks.md). Endpoints on private, loopback, link-local or otherwise
    # non-public addresses are refused (at registration and at every delivery) unless `webhooks_allow_private`:
    # the service must not become a way to reach its own network (SSRF). A failed delivery is retried after
    # `webhooks_backoff_seconds`, doubling each time, at most `webhooks_backoff_max_seconds`, for
    # `webhooks_max_attempts` attempts in all; a delivery whose message was lost (its due time passed by
    # `webhooks_redeliver_seconds`) is sent again by the reapers. Deliveries run on their own Celery queue, so a
    # training job never holds them up.
    webhooks_allow_private: bool = False
    webhooks_queue: str = "webhooks"
    webhooks_timeout_seconds: float = 10.0
    webhooks_max_attempts: int = 10
    webhooks_backoff_seconds: float = 30.0
    webhooks_backoff_max_seconds: float = 6 * 3600.0
    webhooks_redeliver_seconds: float = 120.0
    fault_point: str | None = None  # crash tests only: "<point>[:<n>]" SIGKILLs the worker there (worker.faults)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'neat.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def idle_transaction_seconds(self) -> float:
        return self.lease_seconds if self.db_idle_transaction_seconds is None else self.db_idle_transaction_seconds

    @property
    def inference_server_urls(self) -> list[str]:
        return _urls(self.inference_servers)

    @property
    def llamacpp_server_urls(self) -> list[str]:
        return _urls(self.llamacpp_servers)

    @property
    def resolved_artifact_root(self) -> Path:
        return (self.artifact_root or self.data_dir / "artifacts").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def _urls(listed: str) -> list[str]:
    return [u.strip().rstrip("/") for u in listed.split(",") if u.strip()]
