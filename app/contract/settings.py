"""One settings object per process, read from the environment (`HARMONICA_*`, plus `REDIS_URL`).

The gateway and the workers read the same settings, so queue names, time limits and the Redis
visibility timeout can never disagree between them (serving.md §1.5: the shortest one wins).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from harmonica_core.catalog import DEFAULT_EXECUTION_MODE, EXECUTION_MODES
from harmonica_core.validation import Limits

from .kinds import KINDS


class SettingsBase(BaseSettings):
    """Every setting but the job kinds' time limits, which `Settings` adds from `KINDS`."""

    model_config = SettingsConfigDict(env_prefix="HARMONICA_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "HARMONICA_REDIS_URL"),
        description="broker and job records",
    )
    artifacts_dir: Path = Field(
        Path("var/artifacts"),
        description="the local artifact store (images, routers), shared by gateway and workers; with any store, "
        "the workers' scratch (training checkpoints) and their cache of routers fetched from the object store",
    )
    artifact_store: Literal["local", "s3"] = Field(
        "local",
        description="where images and routers live: local (HARMONICA_ARTIFACTS_DIR) or s3 (an S3-compatible object "
        "store, HARMONICA_S3_*, which workers on other hosts share)",
    )
    artifact_redirect: bool = Field(
        False,
        description="answer image and router downloads with a 307 to a presigned URL of the object store instead "
        "of the bytes (s3 only; clients must reach HARMONICA_S3_PUBLIC_ENDPOINT_URL)",
    )
    presign_seconds: int = Field(300, ge=1, le=7 * 24 * 3600, description="how long a presigned URL stays valid")
    s3_endpoint_url: str = Field("", description="the object store's URL (http://minio:9000); empty: AWS S3")
    s3_public_endpoint_url: str = Field(
        "", description="the object store's URL as clients reach it, for presigned URLs; empty: the endpoint URL"
    )
    s3_bucket: str = Field("harmonica", min_length=3, description="the bucket of the artifacts (it must exist)")
    s3_prefix: str = Field("", description="folder of every artifact key in the bucket (e.g. `prod/`); empty: none")
    s3_region: str = Field("us-east-1", description="the bucket's region (MinIO accepts any)")
    s3_access_key_id: str = Field(
        "", description="the service's object store credentials; empty: boto3's own (AWS_* variables, instance role)"
    )
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="the secret of HARMONICA_S3_ACCESS_KEY_ID")
    api_keys: str = Field("", description="comma-separated `name:sha256hex` entries (see `python -m app.api.keys`)")
    api_keys_file: Path | None = Field(None, description="file with one `name:sha256hex` entry per line")
    models: str = Field("digits", description="comma-separated models the service accepts")
    device: str = Field("cpu", description="workers' torch device: cpu, cuda, cuda:1, ...")
    max_models_per_worker: int = Field(2, ge=1, description="pipelines kept in memory per worker process")
    execution_mode: Literal[tuple(EXECUTION_MODES)] = Field(  # type: ignore[valid-type]
        DEFAULT_EXECUTION_MODE,
        description="how workers run the transformer: " + "; ".join(f"{k}: {v}" for k, v in EXECUTION_MODES.items()),
    )
    graph_memory_mb: int = Field(
        4096,
        ge=0,
        description="GPU memory the graphs mode's captured CUDA graphs and their buffers may hold per worker "
        "process; past it the least recently used shape's graphs are dropped (and captured again when used)",
    )
    max_batch_rows: int = Field(
        32,
        ge=0,
        description="transformer rows (images, doubled by guidance) compatible generation jobs may share "
        "in one denoising batch; 0: every job runs alone",
    )
    batch_wait_ms: float = Field(
        50,
        ge=0,
        description="how long a forming batch waits for more compatible jobs; a job with no compatible "
        "job queued starts at once",
    )
    torch_threads: int = Field(
        0, ge=0, description="torch threads of each worker pool process; 0: this machine's cores over the pool size"
    )

    # Admission limits: requests beyond them get a 4xx that names the limit. Those on requests take their
    # defaults and floors from harmonica_core's `Limits`, which the CLI reads from the same variables.
    max_steps: int = Field(**Limits.setting("max_steps"))
    max_images_per_job: int = Field(**Limits.setting("max_images_per_job"))
    max_resolution: int = Field(**Limits.setting("max_resolution"))
    max_prompt_chars: int = Field(**Limits.setting("max_prompt_chars"))
    max_body_bytes: int = Field(65536, ge=1024)
    max_queue_depth: int = Field(100, ge=1, description="queued jobs per queue before POSTs get 429")
    max_active_jobs_per_key: int = Field(20, ge=1, description="queued or running jobs one API key may have")
    max_train_iterations: int = Field(**Limits.setting("max_train_iterations"))
    max_train_batch_size: int = Field(**Limits.setting("max_train_batch_size"))
    max_eval_samples: int = Field(**Limits.setting("max_eval_samples"))
    max_train_gpus: int = Field(
        **Limits.setting("max_train_gpus"),
        description="processes one training job may ask for (`gpus`): GPUs of a CUDA worker, gloo processes on a CPU",
    )

    # Delivery (seconds). The visibility timeout must exceed every hard time limit (the fields each job kind
    # adds, below), or a long job is handed to a second worker while it runs.
    visibility_timeout: float = Field(7 * 3600, gt=0)
    restore_interval: float = Field(
        10, gt=0, description="seconds between the broker's sweeps returning messages older than the visibility timeout"
    )
    max_deliveries: int = Field(3, ge=1, description="a job delivered more often than this fails")
    lease_seconds: float = Field(30, gt=0, description="a running job's lease; renewed while it runs")
    reconcile_interval: float = Field(
        15, gt=0, description="seconds between sweeps that re-enqueue jobs whose worker or message was lost"
    )
    redis_retry_seconds: float = Field(
        300, gt=0, description="how long a worker retries writing a finished job's state while Redis is away"
    )
    retention_interval: float = Field(3600, gt=0, description="seconds between sweeps that delete expired jobs' files")
    worker_metrics_host: str = Field(
        "127.0.0.1", description="address of the workers' metrics endpoints (0.0.0.0 where Prometheus is remote)"
    )
    webhook_secret: str = Field(
        "", description="server secret the owners' webhook signing keys derive from; empty: webhooks are refused"
    )
    webhook_allow_hosts: str = Field(
        "", description="comma-separated webhook hosts allowed although they resolve to private or loopback addresses"
    )
    webhook_max_attempts: int = Field(6, ge=1, description="deliveries of one webhook before it is given up")
    webhook_timeout_seconds: float = Field(5, gt=0, description="how long a webhook receiver has to answer")
    max_wait_seconds: float = Field(
        60, ge=0, description="the longest a request's `Prefer: wait=N` holds its answer for the job to end"
    )
    job_ttl_seconds: int = Field(7 * 24 * 3600, ge=60, description="how long finished job records are kept")
    worker_heartbeat_seconds: float = Field(5, gt=0)
    key_prefix: str = Field("harmonica:", description="prefix of every Redis key the service writes")

    @model_validator(mode="after")
    def _consistent_limits(self) -> SettingsBase:
        for kind in KINDS.values():
            limits = kind.time_limits(self)
            if limits["soft_time_limit"] >= limits["time_limit"]:
                soft, hard = (f"HARMONICA_{name.upper()}" for name in (kind.soft_limit, kind.hard_limit))
                raise ValueError(f"{soft} must be below {hard}")
        longest = max(kind.time_limits(self)["time_limit"] for kind in KINDS.values())
        if self.visibility_timeout <= longest:
            raise ValueError(
                f"HARMONICA_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) must exceed the longest hard time "
                f"limit ({longest:g} s), or running jobs are redelivered to a second worker"
            )
        return self

    @property
    def model_names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]

    @property
    def webhook_allow_host_set(self) -> set[str]:
        return {host.strip().lower() for host in self.webhook_allow_hosts.split(",") if host.strip()}

    def job_dir(self, job_id: str) -> Path:
        """A job's local scratch folder (with the local store, also where its artifacts are)."""
        return self.artifacts_dir / "jobs" / job_id

    def threads_per_process(self, concurrency: int) -> int:
        """Each pool process's share of the cores: oversubscribed torch threads slow every process down many
        times over, so a worker never runs more than the cores it may use."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, len(os.sched_getaffinity(0)) // concurrency)


def _time_limit_fields() -> dict[str, Any]:
    """Two fields per `JobKind.limits` prefix, `<prefix>_soft_time_limit` and `<prefix>_time_limit`
    (`HARMONICA_GEN_TIME_LIMIT`, ...), with the kind's defaults: a new kind brings its limits with its entry."""
    fields: dict[str, Any] = {}
    for kind in KINDS.values():
        what = f"{kind.description} (and every kind with limits {kind.limits!r})"
        soft = f"seconds before a job of {what} is stopped and fails with `timeout`"
        hard = f"seconds before the pool process running a job of {what} is killed"
        fields.setdefault(kind.soft_limit, (float, Field(kind.soft_seconds, gt=0, description=soft)))
        fields.setdefault(kind.hard_limit, (float, Field(kind.hard_seconds, gt=0, description=hard)))
    return fields


Settings = create_model("Settings", __base__=SettingsBase, __doc__=SettingsBase.__doc__, **_time_limit_fields())


@lru_cache
def get_settings() -> Settings:
    return Settings()
