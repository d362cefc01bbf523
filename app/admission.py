"""Checks that need the operator's limits, the model catalog or the router registry.

A request that passes is normalized (defaults filled, the seed chosen) into the dict the worker
runs; one that fails raises `Rejected`, which the gateway turns into a 422 problem naming the field.
"""

from __future__ import annotations

import secrets
from typing import Any

from harmonica_core.catalog import MODELS
from harmonica_core.schedules import NEEDS_ROUTER

from .registry import RouterRegistry
from .schemas import GenerateRequest, TrainRouterRequest
from .settings import Settings


class Rejected(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _limit(field: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        raise Rejected(field, f"{what} is {value}; this service allows at most {limit}")


def _served(model: str, settings: Settings) -> None:
    if model not in settings.model_names:
        raise Rejected("model", f"model {model!r} is not served here; choose one of {', '.join(settings.model_names)}")


def admit_generate(body: GenerateRequest, settings: Settings, registry: RouterRegistry) -> dict[str, Any]:
    _served(body.model, settings)
    _limit("steps", body.steps, settings.max_steps, "steps")
    request = body.model_dump()
    info = MODELS.get(body.model)
    if info is not None and info.family == "dit":
        if body.prompts is not None:
            raise Rejected("prompts", f"{body.model} is class-conditional: give class_labels, not prompts")
        labels = body.class_labels or list(range(min(info.num_classes, 10)))
        bad = [label for label in labels if not 0 <= label < info.num_classes]
        if bad:
            raise Rejected("class_labels", f"class labels must be in [0, {info.num_classes - 1}] for {body.model}")
        for side in ("height", "width"):
            if getattr(body, side) not in (None, info.size):
                raise Rejected(side, f"{body.model} generates {info.size}x{info.size} images only; omit {side}")
        request["class_labels"] = labels
    elif info is not None:
        if body.class_labels is not None or not body.prompts:
            raise Rejected("prompts", f"{body.model} is text-to-image: give prompts, not class_labels")
        longest = max(len(prompt) for prompt in body.prompts)
        _limit("prompts", longest, settings.max_prompt_chars, "the longest prompt's length in characters")
        for side in ("height", "width"):
            value = getattr(body, side)
            if value is not None:
                if value % 16:
                    raise Rejected(side, f"{side} must be a multiple of 16, got {value}")
                _limit(side, value, min(info.max_size, settings.max_resolution), side)
    groups = len(request["class_labels"] or request["prompts"] or [None])
    _limit("num_images", groups * body.num_images, settings.max_images_per_job, "the number of images in this job")
    request["acceleration"] = _acceleration(body, registry)
    if request["seed"] is None:
        request["seed"] = secrets.randbelow(2**32)
    return request


def _acceleration(body: GenerateRequest, registry: RouterRegistry) -> dict[str, Any]:
    accel = body.acceleration.model_dump()
    method = accel["method"]
    if method not in NEEDS_ROUTER:
        if accel["router_id"] is not None:
            raise Rejected("acceleration.router_id", f"method {method} uses no router; use l2c or harmonica")
        return accel
    if accel["router_id"] is None:
        raise Rejected("acceleration.router_id", f"method {method} needs a router_id (GET /routers lists them)")
    router = registry.get(accel["router_id"])
    if router is None:
        raise Rejected("acceleration.router_id", f"no router {accel['router_id']!r}; GET /routers lists them")
    for field, wanted, trained in (
        ("model", body.model, router.model),
        ("steps", body.steps, router.steps),
        ("scheduler", body.scheduler, router.scheduler),
    ):
        if wanted != trained:
            raise Rejected(field, f"router {router.id} was trained for {field} {trained!r}, not {wanted!r}")
    if router.method != method:
        raise Rejected("acceleration.method", f"router {router.id} runs under method {router.method!r}")
    if accel["threshold"] is None:
        accel["threshold"] = router.metadata.get("threshold", 0.1)
    return accel


def admit_training(body: TrainRouterRequest, settings: Settings) -> dict[str, Any]:
    _served(body.model, settings)
    _limit("steps", body.steps, settings.max_steps, "steps")
    _limit("iterations", body.iterations, settings.max_train_iterations, "iterations")
    _limit("batch_size", body.batch_size, settings.max_train_batch_size, "batch_size")
    _limit("eval_samples", body.eval_samples, settings.max_eval_samples, "eval_samples")
    if body.objective == "l2c" and body.model != "digits":
        raise Rejected("objective", "l2c trains from real data, which this service has for the digits model only")
    return body.model_dump()
