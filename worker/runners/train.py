"""Router training: resumable from its checkpoint, the router published to the owner's registry whole."""

from __future__ import annotations

import os
import time
from typing import Any

from app.contract.jobs import Job
from app.contract.registry import RouterRegistry, trained_router_id
from app.contract.settings import Settings
from harmonica_core.train_config import TrainConfig
from harmonica_core.training import TrainingCancelled, TrainProgress, train_and_save
from harmonica_core.validation import Limits, validate_training

from .. import telemetry
from ..runner import Report, get_model

CANCELLED = TrainingCancelled


def run(job: Job, settings: Settings, report: Report) -> dict[str, Any]:
    req = validate_training(job.request, Limits.of(settings))  # the gateway's checks again
    config = TrainConfig(**{name: req[name] for name in TrainConfig.__dataclass_fields__ if name in req})
    config.validate()
    model = get_model(job.model, settings)
    work = settings.job_dir(job.id)
    work.mkdir(parents=True, exist_ok=True)

    def progress(p: TrainProgress) -> None:  # per router update (also after a resume) and per lambda pass
        if p.phase == "updates":
            telemetry.record_training_update(job.model, config.objective, p.loss)
        report(p.as_dict())

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
