"""`/jobs`: a caller's jobs, one job, its cancellation and its images."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.contract.artifacts import ArtifactMissing
from app.contract.jobs import EVENT_WAIT_MS, FINAL_STATES, Job

from .. import telemetry
from ..artifacts import stored
from ..deps import Owner, Service, ServiceDep
from ..errors import JOB_RESPONSES, ApiError
from ..schemas import JobOut, JobPage
from ..waiting import Prefer, wait_for

router = APIRouter(tags=["jobs"])
JOB_ID = re.compile(r"[0-9a-f]{32}")  # new_job_id(): uuid4 hex; anything else is no job, without asking Redis
PNG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}},
    307: {"description": "with HARMONICA_ARTIFACT_REDIRECT: the image at a presigned URL of the object store"},
    **JOB_RESPONSES,
}
CACHE_IMMUTABLE = "private, max-age=86400, immutable"  # a job's images never change
EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")  # a Redis stream entry id
SSE_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}, **JOB_RESPONSES}


def find_job(service: Service, job_id: str, who: str) -> Job:
    job = service.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None or job.owner != who:
        kept = service.settings.job_ttl_seconds // 3600
        raise ApiError(404, "Job not found", f"no job {job_id!r} (finished jobs are kept {kept} h)")
    return job


@router.get("/jobs/{job_id}", response_model=JobOut, responses=JOB_RESPONSES, summary="Get a job")
def get_job(job_id: str, service: ServiceDep, who: Owner, response: Response, prefer: Prefer = None) -> JobOut:
    """A job's state, progress, result or error; with `Prefer: wait=N`, once it ends or after N seconds."""
    return JobOut.of(wait_for(service, find_job(service, job_id, who), prefer, response))


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse, responses=SSE_RESPONSES, summary="Watch a job")
async def job_events(
    job_id: str,
    service: ServiceDep,
    who: Owner,
    last_event_id: Annotated[
        str | None, Header(description="resume after this event id (what an EventSource sends on reconnect)")
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events of the job as it runs: `state` events (queued, running, ...), a `progress` event per
    denoising step (its time and the branches it computed and reused) or router update, and a last `state`
    event whose data is the finished job, after which the stream ends. Each event has an id: reconnecting
    with `Last-Event-ID` resumes after it without loss."""
    job = find_job(service, job_id, who)
    if last_event_id is not None and not EVENT_ID.fullmatch(last_event_id):
        raise ApiError(400, "Bad Last-Event-ID", f"{last_event_id!r} is not an event id of this stream")
    return EventSourceResponse(_events(service, job, last_event_id or "0"), ping=15)


async def _events(service: Service, job: Job, after: str) -> AsyncIterator[ServerSentEvent]:
    store = service.store
    while True:
        events = await anyio.to_thread.run_sync(partial(store.events, job.id, after, block_ms=EVENT_WAIT_MS))
        for event_id, event in events:
            after, kind = event_id, event.pop("type")
            final = kind == "state" and event["status"] in FINAL_STATES
            if final:
                event = JobOut.of(store.get(job.id) or job).model_dump(mode="json")
            yield ServerSentEvent(json.dumps(event), event=kind, id=event_id)
            if final:
                return
        if not events and after == "0" and (record := store.get(job.id)) is not None and record.final:
            # a job whose log has not been kept (older than the log): its record is its last event
            yield ServerSentEvent(JobOut.of(record).model_dump_json(), event="state", id="0-1")
            return


@router.get("/jobs", response_model=JobPage, responses=JOB_RESPONSES, summary="List your jobs")
def list_jobs(
    service: ServiceDep,
    who: Owner,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    cursor: Annotated[
        float | None, Query(allow_inf_nan=False, description="from the previous page's `next` link")
    ] = None,
) -> JobPage:
    """Your jobs, newest first, a page at a time."""
    jobs, next_cursor = service.store.list(who, limit, cursor)
    following = None if next_cursor is None else f"/jobs?limit={limit}&cursor={next_cursor!r}"
    return JobPage(jobs=[JobOut.of(job) for job in jobs], next=following)


@router.delete(
    "/jobs/{job_id}", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, summary="Cancel a job"
)
def cancel_job(job_id: str, service: ServiceDep, who: Owner) -> JobOut:
    """Cancel: a queued job never runs; a running one stops at its next denoising step or router update."""
    job = find_job(service, job_id, who)
    found = service.store.request_cancel(job.id)
    if found == "queued":
        telemetry.canceled_while_queued(job)
    elif found in FINAL_STATES and found != "canceled":
        raise ApiError(409, "Job already finished", f"job {job.id} already {found}; nothing to cancel")
    return JobOut.of(find_job(service, job_id, who))


def artifact(service: Service, job: Job, name: str | None, what: str) -> Response:
    if job.status != "succeeded" or name is None:
        raise ApiError(404, "Image not found", f"job {job.id} is {job.status}; it has no {what}")
    try:
        return stored(service, f"jobs/{job.id}/{name}", "image/png", {"Cache-Control": CACHE_IMMUTABLE})
    except ArtifactMissing:
        shared = "the gateway and the workers must share one artifact store (HARMONICA_ARTIFACT_STORE)"
        detail = f"{what} of job {job.id} is missing from the artifact store; {shared}"
        raise ApiError(404, "Image not found", detail) from None


@router.get("/jobs/{job_id}/images/{n}", response_class=Response, responses=PNG_RESPONSES, summary="Download an image")
def get_image(job_id: str, n: int, service: ServiceDep, who: Owner) -> Response:
    """The n-th image (from 0) of a succeeded generation job, as PNG."""
    job = find_job(service, job_id, who)
    images = (job.result or {}).get("images", [])
    return artifact(service, job, images[n] if 0 <= n < len(images) else None, f"image {n}")


@router.get("/jobs/{job_id}/grid", response_class=Response, responses=PNG_RESPONSES, summary="Download the image grid")
def get_grid(job_id: str, service: ServiceDep, who: Owner) -> Response:
    """All images of a succeeded generation job on one labelled sheet (a column per label or prompt)."""
    job = find_job(service, job_id, who)
    return artifact(service, job, (job.result or {}).get("grid"), "grid")
