"""The torch side of a worker: models kept per process, and the two kinds of job run with the core.

Imported only inside pool children (by the tasks, at run time), so the Celery parent never
initializes CUDA before it forks (serving.md §1.2).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import metrics
from app.jobs import Job
from app.registry import RouterRegistry, trained_router_id
from app.settings import Settings
from harmonica_core.images import grid, to_pil
from harmonica_core.models import Model, load_model
from harmonica_core.router import load_router
from harmonica_core.sampling import GenerationRequest, generate
from harmonica_core.schedules import NEEDS_ROUTER, make_plan
from harmonica_core.training import TrainConfig, TrainProgress, train_and_save
from harmonica_core.validation import Limits, RouterInfo, validate_generation, validate_training

if TYPE_CHECKING:
    from .tasks import Report

log = logging.getLogger("harmonica.worker")

_models: OrderedDict[str, Model] = OrderedDict()


def get_model(name: str, settings: Settings) -> Model:
    """Load once per process; keep at most `max_models_per_worker`, dropping the least recently used."""
    if name in _models:
        _models.move_to_end(name)
        return _models[name]
    start = time.perf_counter()
    model = load_model(name, device=settings.device)
    metrics.MODEL_LOAD_TIME.labels(name).observe(time.perf_counter() - start)
    _models[name] = model
    while len(_models) > settings.max_models_per_worker:
        _models.popitem(last=False)
    return model


def _write_png(image: Any, path: Path) -> None:
    """Write then rename, so a reader (or a redelivered run) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


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
    plan = make_plan(
        accel["method"], req["steps"], len(model.branch_layout), router=router,
        threshold=accel["threshold"] if accel["threshold"] is not None else 0.1, interval=accel["interval"],
    )  # fmt: skip
    request = GenerationRequest(
        class_labels=req["class_labels"], prompts=req["prompts"], num_images_per_prompt=req["num_images"],
        steps=req["steps"], scheduler=req["scheduler"], guidance=req["guidance"], seed=req["seed"],
        height=req["height"], width=req["width"],
    )  # fmt: skip
    result = generate(model, request, plan, lambda done, total: report({"step": done, "total": total}))
    out = settings.job_dir(job.id)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for index, image in enumerate(to_pil(result.images)):
        names.append(f"{index:03d}.png")
        _write_png(image, out / names[-1])
    # One labelled sheet for people: a column per class label or prompt, tiles at least 64 px.
    sheet = grid(result.images, result.labels, req["num_images"], scale=max(1, 64 // result.images.shape[-1]))
    _write_png(sheet, out / "grid.png")
    stats = result.stats
    method = accel["method"]
    for seconds in stats.step_seconds:
        metrics.STEP_TIME.labels(job.model, method).observe(seconds)
    metrics.BRANCH_EVALUATIONS.labels(job.model, method, "computed").inc(stats.computed)
    metrics.BRANCH_EVALUATIONS.labels(job.model, method, "reused").inc(stats.reused)
    metrics.THEORETICAL_SPEEDUP.labels(job.model, method).observe(stats.theoretical_speedup)
    metrics.IMAGES_GENERATED.labels(job.model).inc(len(names))
    return {"images": names, "grid": "grid.png", "captions": result.labels, "method": method, **stats.as_dict()}


def run_training(job: Job, settings: Settings, report: Report) -> dict[str, Any]:
    req = validate_training(job.request, Limits.of(settings))  # the gateway's checks again
    config = TrainConfig(**{name: req[name] for name in TrainConfig.__dataclass_fields__ if name in req})
    config.validate()
    model = get_model(job.model, settings)
    work = settings.job_dir(job.id)
    work.mkdir(parents=True, exist_ok=True)

    def progress(p: TrainProgress) -> None:  # called once per router update, also after a resume
        metrics.TRAIN_ITERATIONS.labels(job.model, config.objective).inc()
        metrics.TRAIN_LOSS.labels(job.model, config.objective).set(p.loss)
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
    metrics.TRAIN_TIME.labels(job.model, config.objective).observe(seconds)
    return {"router_id": router_id, "quality": quality, "training_seconds": round(seconds, 3)}
