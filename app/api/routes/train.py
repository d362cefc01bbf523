"""`POST /train-router`: a router training job: its request body, its admission and its route."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Response
from pydantic import Field, create_model

from app.contract.settings import Settings
from harmonica_core.train_config import EVAL_SAMPLES, settings
from harmonica_core.validation import TRAINING_BOUNDS as TRAIN
from harmonica_core.validation import Limits, validate_training

from ..deps import Owner, ServiceDep
from ..errors import POST_RESPONSES
from ..schemas import JobOut, Notify, Strict
from ..submit import IdempotencyKey, check_served, submit
from ..waiting import WAITED, Prefer


def _train_request() -> type[Strict]:
    """The training request: the model, then `TrainConfig`'s settings (types, defaults, help and choices as
    the CLI has them), then what only the service asks for."""
    fields: dict[str, Any] = {"model": (str, Field("digits", description="a model from GET /models"))}
    for setting in settings():
        kind = Literal[setting.choices] if setting.choices else setting.type
        kind = kind if setting.default is not None else kind | None
        bounds = TRAIN.get(setting.name, {})
        fields[setting.name] = (kind, Field(setting.default, **bounds, description=setting.help))
    fields["eval_samples"] = (
        int,
        Field(EVAL_SAMPLES, **TRAIN["eval_samples"], description="images generated to measure the router's quality"),
    )
    fields["gpus"] = (
        int,
        Field(
            1,
            **TRAIN["gpus"],
            description="processes that train the router together (torch.distributed): one GPU each on a CUDA "
            "worker, gloo processes on a CPU one; the batch is split among them, so batch_size must be a multiple. "
            "At most HARMONICA_MAX_TRAIN_GPUS (default 1)",
        ),
    )
    name = Field(
        None, max_length=60, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$", description="readable prefix of the router id"
    )
    fields["name"] = (str | None, name)
    return create_model("TrainRouterRequest", __base__=Notify, **fields)


TrainRouterRequest = _train_request()


def admit_training(body: TrainRouterRequest, settings: Settings) -> dict[str, Any]:
    """The core's validation of a training config (shared with the CLI and the workers) with the served models."""
    check_served(body.model, settings)
    return validate_training(body.model_dump(), Limits.of(settings))


EXAMPLES = {  # each is POSTed by tests/service/test_docs.py and must be accepted
    "digits": {
        "summary": "A HarmoniCa router for digits, DDIM, 10 steps",
        "value": {
            "model": "digits",
            "scheduler": "ddim",
            "steps": 10,
            "iterations": 200,
            "lr": 0.1,
            "lambda_every": 50,
            "name": "my-digits-router",
        },
    },
    "ltc": {
        "summary": "The LTC ablation (no image-error weighting)",
        "value": {"model": "digits", "objective": "ltc", "steps": 20, "iterations": 200, "lr": 0.1},
    },
    "image": {
        "summary": "Aimed at 2x, trained on the final image's own error, forecasting reused branches",
        "value": {"model": "digits", "objective": "image", "target_speedup": 2.0, "forecast": 1, "iterations": 80},
    },
}

router = APIRouter(tags=["jobs"])


@router.post(
    "/train-router",
    status_code=202,
    response_model=JobOut,
    responses={**POST_RESPONSES, **WAITED},
    summary="Train a router",
)
def post_train_router(
    body: Annotated[TrainRouterRequest, Body(openapi_examples=EXAMPLES)],
    service: ServiceDep,
    who: Owner,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    prefer: Prefer = None,
) -> JobOut:
    """Train a router for a model, scheduler and step count; the finished job names the new router id."""
    admit = partial(admit_training, body, service.settings)
    return submit(service, "train_router", who, body, admit, idempotency_key, response, prefer=prefer)
