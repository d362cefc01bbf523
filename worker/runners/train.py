"""Router training: resumable from its checkpoint, the router published to the owner's registry whole.

A job with `gpus` above 1 trains under torchrun (`harmonica_core.distributed.launch`, as `harmonica train-router
--nproc` does): rank 0 reports progress through a file this process follows, a cancel stops every rank, and a
rank that dies sends the job to another delivery, which resumes from the checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from app.contract.artifacts import open_store
from app.contract.jobs import Job
from app.contract.registry import RouterRegistry, trained_router_id
from app.contract.settings import Settings
from harmonica_core.cli import training_argv
from harmonica_core.distributed import launch
from harmonica_core.router import read_router
from harmonica_core.train_config import TrainConfig
from harmonica_core.training import TrainingCancelled, train_and_save
from harmonica_core.validation import Limits, validate_training

from .. import telemetry
from ..runner import Report, get_model

CANCELLED = TrainingCancelled


def run(job: Job, settings: Settings, report: Report) -> dict[str, Any]:
    req = validate_training(job.request, Limits.of(settings))  # the gateway's checks again
    config = TrainConfig(**{name: req[name] for name in TrainConfig.__dataclass_fields__ if name in req})
    config.validate()
    work = settings.job_dir(job.id)
    work.mkdir(parents=True, exist_ok=True)
    out, checkpoint = work / "router.safetensors", work / "checkpoint.pt"

    def progress(p: dict[str, Any]) -> None:  # per router update (also after a resume) and per lambda pass
        if p["phase"] == "updates":
            telemetry.record_training_update(job.model, config.objective, p["loss"])
        report(p)

    start = time.perf_counter()
    # The checkpoint lets a redelivered job resume where the dead worker (or rank) stopped.
    if req.get("gpus", 1) > 1:
        argv = training_argv(job.model, config, req["eval_samples"], out, checkpoint, settings.device)
        launch(argv, req["gpus"], settings.device, work / "progress.jsonl", progress)
        quality = read_router(out)[1].quality
    else:
        model, samples = get_model(job.model, settings), req["eval_samples"]
        quality = train_and_save(model, config, out, None, samples, lambda p: progress(p.as_dict()), checkpoint)
    router_id = trained_router_id(req.get("name"), job.id)
    # Uploaded from the scratch folder (moved, with the local store): in the registry whole, or not at all.
    RouterRegistry(open_store(settings), job.owner).publish(router_id, work / "router.safetensors")
    for scratch in (checkpoint, work / "progress.jsonl"):
        scratch.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    telemetry.record_training(job.model, config.objective, seconds)
    return {"router_id": router_id, "quality": quality, "training_seconds": round(seconds, 3)}
