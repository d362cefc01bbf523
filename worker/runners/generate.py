"""Image generation: jobs of one batch key share one denoising batch; each job's request is validated again, and
its images, progress and final state stay its own.

A job canceled (or whose lease was lost) mid-batch drops out at the next step: its rows are still computed and
then discarded, since keeping the batch's shape keeps every cached branch output (and compiled graph) valid.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from app.contract.artifacts import open_store
from app.contract.jobs import Job
from app.contract.registry import RouterRegistry
from app.contract.settings import Settings
from harmonica_core.cache.methods import NEEDS_ROUTER, plan_from_request
from harmonica_core.images import save_images
from harmonica_core.router import load_router
from harmonica_core.sampling import GenerationCancelled, GenerationRequest, StepReport, generate_batch
from harmonica_core.validation import Limits, validate_generation

from .. import telemetry
from ..runner import Outcome, Report, get_model

CANCELLED = GenerationCancelled


def _validated(job: Job, settings: Settings) -> tuple[dict[str, Any], Any]:
    """The gateway's validation again (defence in depth: an InvalidRequest is a ValueError, so invalid_request),
    with the job's router entry if its method uses one."""
    accel, entry = job.request["acceleration"], None
    if accel["method"] in NEEDS_ROUTER:
        entry = RouterRegistry(open_store(settings), job.owner).get(accel["router_id"])
        if entry is None:
            raise ValueError(f"router {accel['router_id']!r} no longer exists")
    info = None if entry is None else entry.info
    return validate_generation(job.request, Limits.of(settings), info), entry


def run_batch(jobs: list[Job], settings: Settings, reports: list[Report]) -> list[Outcome]:
    """Jobs with equal batch keys (equal model, sampler, steps, guidance, size and acceleration) as one batch."""
    outcomes: dict[int, Outcome] = {}
    requests: dict[int, dict[str, Any]] = {}
    entry = None
    for i, job in enumerate(jobs):
        try:
            requests[i], entry = _validated(job, settings)
        except Exception as error:
            outcomes[i] = error
    members = list(requests)
    live = set(members)
    if not members:
        return [outcomes[i] for i in range(len(jobs))]
    first = requests[members[0]]
    try:
        model = get_model(jobs[members[0]].model, settings)
        router = None
        if entry is not None:
            path = entry.local_file(open_store(settings))
            router, _ = load_router(path, model.router_target(first["scheduler"], first["steps"]))
        plan = plan_from_request(first["acceleration"], first["steps"], model.branch_layout, router)

        def on_step(step: StepReport) -> None:
            for i in sorted(live):
                try:
                    reports[i](step.as_dict())
                except Exception as error:  # canceled or lease lost: out of the batch, its rows discarded
                    outcomes[i] = error
                    live.discard(i)
            if not live:
                raise GenerationCancelled("every job of the batch stopped")

        batch = [GenerationRequest.from_request(requests[i]) for i in members]
        results = generate_batch(model, batch, plan, on_step, mode=settings.execution_mode)
    except Exception as error:  # the batch as a whole failed (or every job stopped): each live job gets the reason
        for i in live:
            outcomes[i] = error
        return [outcomes[i] for i in range(len(jobs))]
    method = first["acceleration"]["method"]
    for i, result in zip(members, results, strict=True):
        if i not in live:
            continue
        try:  # one job's post-processing fails that job alone
            req, scratch = requests[i], settings.job_dir(jobs[i].id)
            names = save_images(result.images, result.labels, req["num_images"], scratch)
            publish(settings, jobs[i].id, scratch, [*names, "grid.png"])
            telemetry.record_generation(jobs[i].model, method, result.stats, len(names))
            summary = {"images": names, "grid": "grid.png", "captions": result.labels, "method": method}
            outcomes[i] = summary | result.stats.as_dict()
        except Exception as error:
            outcomes[i] = error
    return [outcomes[i] for i in range(len(jobs))]


def publish(settings: Settings, job_id: str, scratch: Path, names: list[str]) -> None:
    """Move a job's images from its scratch folder into the artifact store (where the store is the local folder,
    they already are in place), then drop the folder if that emptied it."""
    store = open_store(settings)
    for name in names:
        store.publish(f"jobs/{job_id}/{name}", scratch / name)
    with contextlib.suppress(OSError):  # not empty: the local store's own folder
        scratch.rmdir()
