"""The torch side of a worker: models kept per process, and a runner per job kind (`RUNNERS`).

Imported only inside pool children (by the tasks, at run time), so the Celery parent never
initializes CUDA before it forks (serving.md §1.2).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.contract.jobs import Job
from app.contract.registry import RouterRegistry, trained_router_id
from app.contract.settings import Settings
from harmonica_core.cache.methods import NEEDS_ROUTER, plan_from_request
from harmonica_core.images import save_images
from harmonica_core.models import Model, load_model
from harmonica_core.router import load_router
from harmonica_core.sampling import GenerationCancelled, GenerationRequest, generate
from harmonica_core.train_config import TrainConfig
from harmonica_core.training import TrainingCancelled, TrainProgress, train_and_save
from harmonica_core.validation import Limits, RouterInfo, validate_generation, validate_training

from . import telemetry

log = logging.getLogger("harmonica.worker")
Report = Callable[[dict[str, Any]], None]  # progress -> job record; raises the runner's `cancelled` to stop

_models: OrderedDict[str, Model] = OrderedDict()


def get_model(name: str, settings: Settings) -> Model:
    """Load once per process; keep at most `max_models_per_worker`, dropping the least recently used."""
    if name in _models:
        _models.move_to_end(name)
        return _models[name]
    start = time.perf_counter()
    model = load_model(name, device=settings.device)
    telemetry.record_model_load(name, time.perf_counter() - start)
    _models[name] = model
    while len(_models) > settings.max_models_per_worker:
        _models.popitem(last=False)
    return model


def run_generation(job: Job, settings: Settings, report: Report) -> dict[str, Any]:
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


def run_training(job: Job, settings: Settings, report: Report) -> dict[str, Any]:
    req = validate_training(job.request, Limits.of(settings))  # the gateway's checks again
    config = TrainConfig(**{name: req[name] for name in TrainConfig.__dataclass_fields__ if name in req})
    config.validate()
    model = get_model(job.model, settings)
    work = settings.job_dir(job.id)
    work.mkdir(parents=True, exist_ok=True)

    def progress(p: TrainProgress) -> None:  # called once per router update, also after a resume
        telemetry.record_training_update(job.model, config.objective, p.loss)
        report({"iteration": p.iteration, "total": p.total, "loss": p.loss, "cache_usage_rate": p.cache_usage_rate})

    start = time.perf_counter()
    # The checkpoint lets a redelivered job resume where the dead worker stopped.
    quality = train_and_save(
        model, config, work / "router.safetensors", None, req["eval_samples"], progress, work / "checkpoint.pt"
    )
    router_id = trained_router_id(req.get("name"), job.id)
    target = RouterRegistry(settings.routers_dir, job.owner).path_for(router_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work / "router.safetensors", target)  # appears in the registry whole, or not at all
    (work / "checkpoint.pt").unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    telemetry.record_training(job.model, config.objective, seconds)
    return {"router_id": router_id, "quality": quality, "training_seconds": round(seconds, 3)}


@dataclass(frozen=True)
class Runner:
    """How a job kind runs: the function, and the exception its `report` raises to stop it (cancellation)."""

    run: Callable[[Job, Settings, Report], dict[str, Any]]
    cancelled: type[Exception]


# One entry per job kind of `app.contract.kinds.KINDS`; `worker.tasks` registers a Celery task for each kind.
RUNNERS: dict[str, Runner] = {
    "generate": Runner(run_generation, GenerationCancelled),
    "train_router": Runner(run_training, TrainingCancelled),
}
