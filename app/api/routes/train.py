"""`POST /train-router`: a router training job."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Response

from ..admission import admit_training
from ..deps import Owner, ServiceDep
from ..errors import POST_RESPONSES
from ..schemas import JobOut, TrainRouterRequest
from ..submit import IdempotencyKey, submit

router = APIRouter(tags=["jobs"])


@router.post("/train-router", status_code=202, response_model=JobOut, responses=POST_RESPONSES)
def post_train_router(
    body: TrainRouterRequest,
    service: ServiceDep,
    who: Owner,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Train a router for a model, scheduler and step count; the finished job names the new router id."""
    admit = partial(admit_training, body, service.settings)
    return submit(service, "train_router", who, body, admit, idempotency_key, response)
