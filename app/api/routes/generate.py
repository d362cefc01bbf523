"""`POST /generate`: an image generation job."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Response

from ..admission import admit_generate
from ..deps import Owner, Routers, ServiceDep
from ..errors import POST_RESPONSES
from ..schemas import GenerateRequest, JobOut
from ..submit import IdempotencyKey, submit

router = APIRouter(tags=["jobs"])


@router.post("/generate", status_code=202, response_model=JobOut, responses=POST_RESPONSES)
def post_generate(
    body: GenerateRequest,
    service: ServiceDep,
    who: Owner,
    registry: Routers,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Generate images; poll the returned job (Location header) until it succeeds, then fetch its images."""
    admit = partial(admit_generate, body, service.settings, registry)
    return submit(service, "generate", who, body, admit, idempotency_key, response)
