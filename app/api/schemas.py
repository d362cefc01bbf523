"""The HTTP bodies every resource shares: jobs, routers, models, problems. A job kind's request body lives
with its route (`routes/<kind>.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.contract.jobs import Job
from app.contract.kinds import KINDS
from harmonica_core.cache.methods import METHODS
from harmonica_core.catalog import SCHEDULER_NAMES

Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
KindName = Literal[tuple(KINDS)]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no true -> 1, no "5" -> 5


class Notify(Strict):
    """What every job request may add: where to tell its owner about the job (`app/contract/webhooks.py`)."""

    webhook: str | None = Field(
        None,
        max_length=2000,
        description="an http(s) URL that gets a signed POST of the job when it ends (Standard Webhooks headers; "
        "the key is GET /webhooks/secret); its host must be public unless the operator allows it",
    )
    webhook_progress: bool = Field(False, description="also POST the job as it progresses, about once a second")


class Links(BaseModel):
    self: str
    cancel: str
    images: list[str] = Field(default_factory=list, description="PNG of each image, once the job succeeded")
    grid: str | None = Field(None, description="all images on one labelled PNG sheet, once the job succeeded")
    router: str | None = Field(None, description="the trained router, once a training job succeeded")


class JobError(BaseModel):
    code: str = Field(description="timeout, invalid_request, redelivery_limit, internal")
    message: str


class JobOut(BaseModel):
    id: str
    kind: KindName
    status: JobStatus
    model: str
    created_at: float = Field(description="Unix time")
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any] = Field(description="the accepted request, with defaults filled in")
    progress: dict[str, Any] = Field(
        description="the latest report. generate: step, total, step_seconds, computed_branches and "
        "reused_branches of that step; train_router: iteration, total, loss, cache_usage_rate"
    )
    result: dict[str, Any] | None = Field(
        None, description="generate: images, cache_usage_rate, theoretical_speedup, computed/reused branches, "
        "timings, the worker's execution_mode; train_router: router_id and its measured quality",
    )  # fmt: skip
    error: JobError | None = None
    deliveries: int = Field(description="times a worker picked the job up (above 1 after a worker died)")
    cancel_requested: bool
    links: Links

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """The record as its owner sees it (without the owner), with links to what the job made."""
        base = f"/jobs/{job.id}"
        result = job.result or {}
        images = [f"{base}/images/{n}" for n in range(len(result.get("images", [])))]
        router = f"/routers/{result['router_id']}" if "router_id" in result else None
        grid = f"{base}/grid" if "grid" in result else None
        links = Links(self=base, cancel=base, images=images, grid=grid, router=router)
        return cls(**{k: v for k, v in job.__dict__.items() if k != "owner"}, links=links)


class JobPage(BaseModel):
    jobs: list[JobOut]
    next: str | None = Field(None, description="URL of the next (older) page, absent on the last page")


class RouterOut(BaseModel):
    id: str
    builtin: bool
    model: str
    scheduler: str
    steps: int
    method: str = Field(description="the cache method the router runs under (harmonica or l2c)")
    objective: str | None
    threshold: float | None
    branches: int
    quality: dict[str, Any] = Field(description="measured against uncached generation when it was trained")
    training: dict[str, Any]
    created_at: float


class RouterDetail(RouterOut):
    branch_layout: list[str] = Field(description="the branches, `<block>.<kind>`, in the plan's column order")
    plan: list[list[bool]] = Field(
        description="steps x branches: true where the branch computes at the router's threshold, false where "
        "it reuses; empty for router files written before plans were recorded"
    )


class ModelOut(BaseModel):
    id: str
    description: str
    family: str = Field(description="dit: class labels; pixart: prompts")
    num_classes: int
    size: int = Field(description="default image side in pixels")
    max_size: int = Field(description="largest image side in pixels (DiT models: their one size)")
    routers: list[str] = Field(description="router ids for this model")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
