"""HTTP request and response bodies. Static bounds come from `harmonica_core.validation` (the CLI and the
workers check the same ones); limits the settings define are checked in `admission.py` against the configured
values, so the OpenAPI schema documents the fields and the operator keeps the numbers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.contract.jobs import Job
from app.contract.kinds import KINDS
from harmonica_core.cache.methods import METHODS, methods_using, parameters
from harmonica_core.catalog import SCHEDULER_NAMES
from harmonica_core.train_config import EVAL_SAMPLES, settings
from harmonica_core.validation import GENERATION_BOUNDS as GEN
from harmonica_core.validation import TRAINING_BOUNDS as TRAIN

Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
KindName = Literal[tuple(KINDS)]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no true -> 1, no "5" -> 5


def _acceleration() -> type[Strict]:
    """The `acceleration` body: a method and each method's parameters, all from the core's method registry, so
    a new cache method appears here without an edit."""
    methods = "; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items())
    router = "router for l2c/harmonica, from GET /routers; it must match the model, scheduler and steps"
    fields: dict[str, Any] = {
        "method": (Method, Field("none", description=methods)),
        "router_id": (str | None, Field(None, description=router)),
    }
    for name, param in parameters().items():
        kind = param.type if param.default is not None else param.type | None
        description = f"{methods_using(param)}: {param.help}"
        fields[name] = (kind, Field(param.default, **param.bounds, description=description))
    return create_model("Acceleration", __base__=Strict, **fields)


Acceleration = _acceleration()


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


def _train_request() -> type[Strict]:
    """The training request: the model, then `TrainConfig`'s settings (types, defaults, help and choices as
    the CLI has them), then what only the service asks for."""
    fields: dict[str, Any] = {"model": (str, Field("digits", description="a model from GET /models"))}
    for setting in settings():
        kind = Literal[setting.choices] if setting.choices else setting.type
        bounds = TRAIN.get(setting.name, {})
        fields[setting.name] = (kind, Field(setting.default, **bounds, description=setting.help))
    fields["eval_samples"] = (
        int,
        Field(EVAL_SAMPLES, **TRAIN["eval_samples"], description="images generated to measure the router's quality"),
    )
    name = Field(
        None, max_length=60, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$", description="readable prefix of the router id"
    )
    fields["name"] = (str | None, name)
    return create_model("TrainRouterRequest", __base__=Strict, **fields)


TrainRouterRequest = _train_request()


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
        description="generate: step, total; train_router: iteration, total, loss, cache_usage_rate"
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
