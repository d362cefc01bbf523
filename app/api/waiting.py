"""`Prefer: wait=N` (RFC 7240): a request may hold its answer until the job ends, for at most N seconds."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Header, Response

from app.contract.jobs import Job

from .deps import Service
from .schemas import JobOut

PREFER = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)

Prefer = Annotated[
    str | None,
    Header(
        description="`wait=N`: hold the answer up to N seconds (at most HARMONICA_MAX_WAIT_SECONDS) for the job "
        "to end; the answer then says `Preference-Applied: wait=N`, and a POST whose job ended answers 200",
        examples=["wait=10"],
    ),
]

WAITED: dict[int | str, dict[str, object]] = {
    200: {"model": JobOut, "description": "with `Prefer: wait=N`: the job ended within N seconds"}
}


def wait_for(service: Service, job: Job, prefer: str | None, response: Response) -> Job:
    """The job once it ends, or as it is after the preferred wait (bounded by the setting); as is without one."""
    found = PREFER.search(prefer or "")
    if found is None:
        return job
    seconds = min(float(found.group(1)), service.settings.max_wait_seconds)
    response.headers["Preference-Applied"] = f"wait={seconds:g}"
    if job.final or seconds <= 0:
        return job
    return service.store.wait_final(job.id, seconds) or job
