"""Image generation: the stored request validated again, its plan, the images written to the job's folder."""

from __future__ import annotations

from typing import Any

from app.contract.jobs import Job
from app.contract.registry import RouterRegistry
from app.contract.settings import Settings
from harmonica_core.cache.methods import NEEDS_ROUTER, plan_from_request
from harmonica_core.images import save_images
from harmonica_core.router import load_router
from harmonica_core.sampling import GenerationCancelled, GenerationRequest, generate
from harmonica_core.validation import Limits, RouterInfo, validate_generation

from .. import telemetry
from ..runner import Report, get_model

CANCELLED = GenerationCancelled


def run(job: Job, settings: Settings, report: Report) -> dict[str, Any]:
    accel, entry = job.request["acceleration"], None
    if accel["method"] in NEEDS_ROUTER:
        entry = RouterRegistry(settings.routers_dir, job.owner).get(accel["router_id"])
        if entry is None:
            raise ValueError(f"router {accel['router_id']!r} no longer exists")
    # The gateway's validation again (defence in depth): an InvalidRequest is a ValueError, so invalid_request.
    info = None if entry is None else RouterInfo.from_metadata(entry.id, entry.metadata)
    req = validate_generation(job.request, Limits.of(settings), info)
    accel = req["acceleration"]
    model = get_model(job.model, settings)
    router = None
    if entry is not None:
        router, _ = load_router(entry.path, model.router_target(req["scheduler"], req["steps"]))
    plan = plan_from_request(accel, req["steps"], model.branch_layout, router)
    request = GenerationRequest.from_request(req)

    def on_step(done: int, total: int) -> None:
        report({"step": done, "total": total})

    result = generate(model, request, plan, on_step, mode=settings.execution_mode)
    names = save_images(result.images, result.labels, req["num_images"], settings.job_dir(job.id))
    method = accel["method"]
    telemetry.record_generation(job.model, method, result.stats, len(names))
    summary = {"images": names, "grid": "grid.png", "captions": result.labels, "method": method}
    return summary | {"execution_mode": settings.execution_mode, **result.stats.as_dict()}
