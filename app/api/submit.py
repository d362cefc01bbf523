"""Submission, what the POST routes of every job kind share: admission (each kind's `admit`, raising the core's
`InvalidRequest`, a 422), the Idempotency-Key binding, the job's atomic creation within the limits, its message,
and the 202 answer with a Location to poll."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Header, Response
from pydantic import BaseModel

from app.contract.jobs import Job, new_job_id, now
from app.contract.kinds import KINDS
from app.contract.queue import enqueue
from app.contract.settings import Settings
from app.contract.webhooks import check_url
from harmonica_core.errors import InvalidRequest

from . import telemetry
from .deps import Service
from .errors import ApiError
from .schemas import JobOut
from .waiting import wait_for

log = logging.getLogger("harmonica.gateway")

IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="optional; the same key and body return the same job while job records are "
        "kept (HARMONICA_JOB_TTL_SECONDS, 7 days); the same key with another body is a 422",
    ),
]


def check_served(model: str, settings: Settings) -> None:
    """Only the models this deployment serves (`HARMONICA_MODELS`) are admitted."""
    if model not in settings.model_names:
        choices = ", ".join(settings.model_names)
        raise InvalidRequest("model", f"model {model!r} is not served here; choose one of {choices}")


def submit(
    service: Service,
    kind: str,
    who: str,
    body: BaseModel,
    admit: Callable[[], dict[str, Any]],
    idempotency_key: str | None,
    response: Response,
    batch: Callable[[dict[str, Any]], tuple[str, int]] | None = None,
    prefer: str | None = None,
) -> JobOut:
    """Admit the body (`admit` returns the normalized request or raises `InvalidRequest`), bind the idempotency key,
    then create and enqueue the job; a replay of a bound key returns the bound job. `batch` gives the (key, rows)
    of a kind whose jobs may share a batch (`JobStore.claim_batch`). `prefer`: the Prefer header, whose
    `wait=N` holds the answer until the job ends (then 200) or N seconds pass (202)."""
    try:
        request = admit()
    except InvalidRequest as error:
        telemetry.rejected("invalid")
        errors = [{"field": error.field, "message": str(error)}]
        raise ApiError(422, "Invalid request", str(error), errors=errors) from None
    fingerprint = hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    job = Job(new_job_id(), kind, "queued", who, request["model"], request, now())
    job.webhook, job.webhook_progress = (
        checked_webhook(body, service.settings),
        getattr(body, "webhook_progress", False),
    )
    if batch is not None:
        job.batch_key, job.batch_rows = batch(request)
    bound_key = None if idempotency_key is None else f"{kind}:{idempotency_key}"
    if bound_key is not None:
        bound = service.store.claim_idempotency_key(who, bound_key, job.id, fingerprint)
        if bound is not None:
            bound_id, bound_fingerprint = bound
            if bound_fingerprint != fingerprint:
                detail = "this Idempotency-Key was used with a different body; use a new key for a new request"
                raise ApiError(422, "Idempotency-Key reused", detail)
            existing = service.store.get(bound_id)
            if existing is None:
                detail = "the first request with this key is still being accepted; retry shortly"
                raise ApiError(409, "Request in progress", detail, {"Retry-After": "1"})
            return accepted(service, existing, response, prefer)
    try:
        admit_and_enqueue(service, job)
    except ApiError:
        if bound_key is not None:  # refused or not enqueued: a retry with the same key must be able to succeed
            service.store.release_idempotency_key(who, bound_key)
        raise
    return accepted(service, job, response, prefer)


def checked_webhook(body: BaseModel, settings: Settings) -> str | None:
    """The body's webhook URL if webhooks are on here and it passes the SSRF checks; else a 422."""
    url = getattr(body, "webhook", None)
    if url is None:
        return None
    if not settings.webhook_secret:
        detail = "webhooks are off on this service (its operator sets HARMONICA_WEBHOOK_SECRET to turn them on)"
        raise ApiError(422, "Webhooks off", detail, errors=[{"field": "webhook", "message": detail}])
    try:
        check_url(url, settings.webhook_allow_host_set)
    except ValueError as error:
        raise ApiError(
            422, "Webhook refused", str(error), errors=[{"field": "webhook", "message": str(error)}]
        ) from None
    return url


def admit_and_enqueue(service: Service, job: Job) -> None:
    """Create the record within the limits (one atomic step, so no burst gets past them) and enqueue it."""
    limits = service.settings
    refusal = service.store.admit(job, limits.max_active_jobs_per_key, limits.max_queue_depth)
    if refusal is not None:
        telemetry.rejected(refusal)
        reasons = {
            "key_busy": f"you have {limits.max_active_jobs_per_key} jobs queued or running; wait for one to end",
            "queue_full": f"the {KINDS[job.kind].queue} queue holds {limits.max_queue_depth} jobs; retry later",
        }
        raise ApiError(429, "Too many jobs", reasons[refusal], {"Retry-After": "10"})
    try:
        enqueue(service.celery, job.kind, job.id)
    except Exception as error:  # broker down: the accepted record must still end in a final state
        service.store.transition(job.id, ("queued",), "failed", error={"code": "internal", "message": str(error)})
        raise ApiError(503, "Queue unavailable", "could not enqueue the job; retry shortly") from error
    telemetry.submitted(job)
    extra = {"job_id": job.id, "kind": job.kind, "model": job.model, "owner": job.owner}
    log.info("job %s accepted", job.id, extra=extra)


def accepted(service: Service, job: Job, response: Response, prefer: str | None) -> JobOut:
    response.headers["Location"] = f"/jobs/{job.id}"
    job = wait_for(service, job, prefer, response)
    if job.final and "Preference-Applied" in response.headers:
        response.status_code = 200
    else:
        response.status_code = 202
        response.headers["Retry-After"] = "1"
    return JobOut.of(job)
