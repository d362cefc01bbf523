"""Admission: the core's request validation (shared with the CLI and the workers) plus what only the
service knows: which models it serves, its router registry, and the seed it picks when none is given.

A request that passes is normalized (defaults filled, the seed chosen) into the dict the worker
runs; one that fails raises `Rejected`, which the gateway turns into a 422 problem naming the field.
"""

from __future__ import annotations

import secrets
from typing import Any

from app.contract.registry import RouterRegistry
from app.contract.settings import Settings
from harmonica_core.cache.methods import NEEDS_ROUTER
from harmonica_core.errors import InvalidRequest as Rejected
from harmonica_core.validation import GENERATION_BOUNDS, Limits, RouterInfo, validate_generation, validate_training

from .schemas import Acceleration, GenerateRequest, TrainRouterRequest

__all__ = ["Rejected", "admit_generate", "admit_training"]


def _served(model: str, settings: Settings) -> None:
    if model not in settings.model_names:
        raise Rejected("model", f"model {model!r} is not served here; choose one of {', '.join(settings.model_names)}")


def _router(accel: Acceleration, registry: RouterRegistry) -> RouterInfo | None:
    """The registry's router for a method that uses one; the core checks it fits the request."""
    if accel.method not in NEEDS_ROUTER or accel.router_id is None:
        return None
    entry = registry.get(accel.router_id)
    if entry is None:
        raise Rejected("acceleration.router_id", f"no router {accel.router_id!r}; GET /routers lists them")
    return entry.info


def admit_generate(body: GenerateRequest, settings: Settings, registry: RouterRegistry) -> dict[str, Any]:
    _served(body.model, settings)
    request = validate_generation(
        body.model_dump(),
        Limits.of(settings),
        _router(body.acceleration, registry),
        router_help="a router_id (GET /routers lists them)",
    )
    if request["seed"] is None:
        request["seed"] = secrets.randbelow(int(GENERATION_BOUNDS["seed"]["le"]) + 1)
    return request


def admit_training(body: TrainRouterRequest, settings: Settings) -> dict[str, Any]:
    _served(body.model, settings)
    return validate_training(body.model_dump(), Limits.of(settings))
