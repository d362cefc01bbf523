"""`/routers`: the built-in routers and those the caller's key trained."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import Routers
from ..errors import JOB_RESPONSES, ApiError
from ..schemas import RouterOut

router = APIRouter(tags=["routers"])


@router.get("/routers", response_model=list[RouterOut], responses=JOB_RESPONSES, summary="List routers")
def list_routers(registry: Routers, model: str | None = None) -> list[dict[str, Any]]:
    """Built-in routers and those your key trained, with what they were trained for and their measured quality."""
    return [r.summary() for r in registry.all() if model is None or r.model == model]


@router.get("/routers/{router_id}", response_model=RouterOut, responses=JOB_RESPONSES, summary="Get a router")
def get_router(router_id: str, registry: Routers) -> dict[str, Any]:
    """A built-in router or one your key trained."""
    router = registry.get(router_id)
    if router is None:
        raise ApiError(404, "Router not found", f"no router {router_id!r}; GET /routers lists them")
    return router.summary()
