"""HTTP request and response bodies. Static bounds come from `harmonica_core.validation` (the CLI and the
workers check the same ones); limits the settings define are checked in `admission.py` against the configured
values, so the OpenAPI schema documents the fields and the operator keeps the numbers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harmonica_core.catalog import LAMBDA_MODES, OBJECTIVES, SCHEDULER_NAMES
from harmonica_core.schedules import METHODS
from harmonica_core.validation import GENERATION_BOUNDS as GEN
from harmonica_core.validation import TRAINING_BOUNDS as TRAIN

Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]
Objective = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]
LambdaMode = Literal[LAMBDA_MODES]  # type: ignore[valid-type]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
JobKind = Literal["generate", "train_router"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no true -> 1, no "5" -> 5


class Acceleration(Strict):
    method: Method = Field(
        "none",
        description="none: compute every branch; fora: compute every `interval`-th step; l2c: a trained L2C router "
        "on alternating steps; harmonica: a trained HarmoniCa router, thresholded at `threshold`",
    )
    router_id: str | None = Field(
        None, description="router for l2c/harmonica, from GET /routers; it must match the model, scheduler and steps"
    )
    threshold: float | None = Field(
        None, **GEN["acceleration.threshold"], description="harmonica: compute a branch where the router value "
        "exceeds this (default: the router's training threshold); lower means more computation and higher quality",
    )  # fmt: skip
    interval: int = Field(
        2, **GEN["acceleration.interval"], description="fora: compute every N-th step, reuse in between"
    )


class GenerateRequest(Strict):
    model: str = Field("digits", description="a model from GET /models")
    class_labels: list[int] | None = Field(
        None, min_length=1, description="class-conditional models (DiT, digits): one class id per image group"
    )
    prompts: list[str] | None = Field(
        None, min_length=1, description="text-to-image models (PixArt): one prompt per image group"
    )
    num_images: int = Field(1, **GEN["num_images"], description="images per class label or prompt")
    steps: int = Field(20, **GEN["steps"], description="denoising steps")
    scheduler: Scheduler = Field("ddim", description="sampler")
    guidance: float = Field(1.5, **GEN["guidance"], description="classifier-free guidance scale (1 = off)")
    seed: int | None = Field(None, **GEN["seed"], description="noise seed; omitted: the server picks one and "
                             "reports it in the job")  # fmt: skip
    height: int | None = Field(
        None, **GEN["height"], description="pixels; PixArt only (multiple of 16); DiT sizes are fixed"
    )
    width: int | None = Field(
        None, **GEN["width"], description="pixels; PixArt only (multiple of 16); DiT sizes are fixed"
    )
    acceleration: Acceleration = Field(default_factory=Acceleration, description="the feature cache to use")


class TrainRouterRequest(Strict):
    model: str = Field("digits", description="a model from GET /models")
    steps: int = Field(20, **TRAIN["steps"], description="sampling steps T the router is for (it only runs at this T)")
    scheduler: Scheduler = Field("ddim", description="sampler the router is for")
    objective: Objective = Field(
        "iepo", description="iepo: HarmoniCa (SDT + image-error proxy); ltc: SDT without the proxy; l2c: Learning-to-"
        "Cache from real data (digits only here)",
    )  # fmt: skip
    iterations: int = Field(1000, **TRAIN["iterations"], description="router updates")
    batch_size: int = Field(8, **TRAIN["batch_size"], description="samples per training trajectory")
    lr: float = Field(0.01, **TRAIN["lr"], description="Adam learning rate")
    beta: float = Field(7e-8, **TRAIN["beta"], description="weight of the reuse pressure; higher = more cache use")
    tau: float = Field(
        0.1, **TRAIN["tau"], description="cache-update threshold in training and the default at inference"
    )
    lambda_every: int = Field(
        100, **TRAIN["lambda_every"], description="iepo: router updates between refreshes of the proxy weights"
    )
    lambda_mode: LambdaMode = Field("cumulative", description="iepo: how the proxy weights are measured")
    guidance: float = Field(1.5, **TRAIN["guidance"], description="guidance scale of the trajectories")
    seed: int = Field(0, **TRAIN["seed"])
    eval_samples: int = Field(
        100, **TRAIN["eval_samples"], description="images generated to measure the trained router's quality"
    )
    name: str | None = Field(
        None, max_length=60, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$", description="readable prefix of the router id"
    )


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
    kind: JobKind
    status: JobStatus
    model: str
    created_at: float = Field(description="Unix time")
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any] = Field(description="the accepted request, with defaults filled in")
    progress: dict[str, Any] = Field(
        description="generate: step, total; train_router: iteration, total, loss, cache_usage_rate"
    )
    result: dict[str, Any] | None = Field(
        None, description="generate: images, cache_usage_rate, theoretical_speedup, computed/reused branches, "
        "timings; train_router: router_id and its measured quality",
    )  # fmt: skip
    error: JobError | None = None
    deliveries: int = Field(description="times a worker picked the job up (above 1 after a worker died)")
    cancel_requested: bool
    links: Links


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


class ModelOut(BaseModel):
    id: str
    description: str
    family: str = Field(description="dit: class labels; pixart: prompts")
    num_classes: int
    size: int = Field(description="default image side in pixels")
    max_size: int
    routers: list[str] = Field(description="router ids for this model")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
