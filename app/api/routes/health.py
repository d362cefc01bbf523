"""Operations, open without a key: liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ..deps import ServiceDep
from ..errors import JOB_RESPONSES, problem

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: JOB_RESPONSES[503]}, summary="Readiness")
def readyz(service: ServiceDep) -> Any:
    """Redis answers and at least one worker is alive with a model loaded (per its heartbeat)."""
    try:
        service.redis.ping()
        workers = service.store.workers()
    except redis.RedisError as error:
        return problem(503, "Not ready", f"Redis unreachable: {error}")
    if not workers:
        return problem(503, "Not ready", "no worker is alive; start one with `python -m worker`")
    if not any(worker["models"] for worker in workers.values()):
        return problem(503, "Not ready", "workers are up but still loading their models", {"Retry-After": "5"})
    return {"status": "ready", "workers": workers}


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def prometheus_metrics() -> Response:
    """Prometheus exposition: job counters, queue depth, live workers (workers export the rest)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
