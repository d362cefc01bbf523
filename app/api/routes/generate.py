"""`POST /generate`: an image generation job: its request body, its admission and its route."""

from __future__ import annotations

import secrets
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Response
from pydantic import Field, create_model

from app.contract.registry import RouterRegistry
from app.contract.settings import Settings
from harmonica_core.cache.methods import METHODS, NEEDS_ROUTER, methods_using, parameters
from harmonica_core.catalog import SCHEDULER_NAMES
from harmonica_core.errors import InvalidRequest
from harmonica_core.validation import GENERATION_BOUNDS as GEN
from harmonica_core.validation import Limits, RouterInfo, batch_signature, validate_generation

from ..deps import Owner, Routers, ServiceDep
from ..errors import POST_RESPONSES
from ..schemas import JobOut, Notify, Strict
from ..submit import IdempotencyKey, check_served, submit
from ..waiting import WAITED, Prefer

Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]


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


class GenerateRequest(Notify):
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


def _router(accel: Acceleration, registry: RouterRegistry) -> RouterInfo | None:
    """The registry's router for a method that uses one; the core checks it fits the request."""
    if accel.method not in NEEDS_ROUTER or accel.router_id is None:
        return None
    entry = registry.get(accel.router_id)
    if entry is None:
        raise InvalidRequest("acceleration.router_id", f"no router {accel.router_id!r}; GET /routers lists them")
    return entry.info


def admit_generate(body: GenerateRequest, settings: Settings, registry: RouterRegistry) -> dict[str, Any]:
    """The core's validation (shared with the CLI and the workers) with the served models, the caller's routers
    and, when none is given, a seed chosen here and recorded in the job."""
    check_served(body.model, settings)
    request = validate_generation(
        body.model_dump(),
        Limits.of(settings),
        _router(body.acceleration, registry),
        router_help="a router_id (GET /routers lists them)",
    )
    if request["seed"] is None:
        request["seed"] = secrets.randbelow(int(GEN["seed"]["le"]) + 1)
    return request


EXAMPLES = {  # each is POSTed by tests/service/test_docs.py and must be accepted
    "harmonica": {
        "summary": "HarmoniCa: the built-in digits router",
        "value": {
            "model": "digits",
            "class_labels": [3, 7],
            "num_images": 2,
            "steps": 20,
            "seed": 0,
            "acceleration": {"method": "harmonica", "router_id": "builtin-digits-image-ddim-t20-x2"},
        },
    },
    "fora": {
        "summary": "FORA: every branch reused for 2 steps out of 3",
        "value": {
            "model": "digits",
            "class_labels": [0, 1, 2],
            "steps": 20,
            "acceleration": {"method": "fora", "interval": 3},
        },
    },
    "forecast": {
        "summary": "FORA with forecasting: reused branches extrapolated from their last two outputs",
        "value": {
            "model": "digits",
            "class_labels": [4],
            "acceleration": {"method": "fora", "interval": 3, "forecast": 1},
        },
    },
    "none": {"summary": "No cache: the reference images", "value": {"model": "digits", "class_labels": [5], "seed": 1}},
}

router = APIRouter(tags=["jobs"])


@router.post(
    "/generate",
    status_code=202,
    response_model=JobOut,
    responses={**POST_RESPONSES, **WAITED},
    summary="Generate images",
)
def post_generate(
    body: Annotated[GenerateRequest, Body(openapi_examples=EXAMPLES)],
    service: ServiceDep,
    who: Owner,
    registry: Routers,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> JobOut:
    """Generate images; poll the returned job (Location header) until it succeeds, then fetch its images."""
    admit = partial(admit_generate, body, service.settings, registry)
    return submit(service, "generate", who, body, admit, idempotency_key, response, batch_signature, prefer)
