"""`/webhooks/secret`: the key a caller verifies its webhooks' signatures with."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.contract.webhooks import secret_for

from ..deps import Owner, ServiceDep
from ..errors import JOB_RESPONSES, ApiError

router = APIRouter(tags=["webhooks"])


class WebhookSecret(BaseModel):
    secret: str = Field(description="`whsec_<base64>`: the HMAC-SHA256 key of your webhooks' `webhook-signature`")


@router.get("/webhooks/secret", response_model=WebhookSecret, responses=JOB_RESPONSES, summary="Your webhook key")
def webhook_secret(service: ServiceDep, who: Owner) -> WebhookSecret:
    """The key your jobs' webhooks are signed with (Standard Webhooks: `v1,` then the base64 HMAC-SHA256 of
    `<webhook-id>.<webhook-timestamp>.<body>`). It is derived from the service's secret and your key's name."""
    if not service.settings.webhook_secret:
        raise ApiError(404, "Webhooks off", "webhooks are off on this service (HARMONICA_WEBHOOK_SECRET is unset)")
    return WebhookSecret(secret=secret_for(who, service.settings))
