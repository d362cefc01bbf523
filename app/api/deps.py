"""What route handlers receive through FastAPI's dependency injection, as `Annotated` aliases: the service
built at start-up, the caller's key name (`Owner`, 401 without a valid key) and the routers it may use."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Header, Request

from app.contract.artifacts import open_store
from app.contract.jobs import JobStore
from app.contract.queue import make_celery
from app.contract.registry import RouterRegistry
from app.contract.settings import Settings

from . import telemetry
from .errors import ApiError
from .keys import identify, load_keys


class Service:
    """What a request handler needs, built once at start-up from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.store = JobStore(self.redis, settings.key_prefix, settings.job_ttl_seconds)
        self.celery = make_celery(settings)
        self.keys = load_keys(settings)
        self.artifacts = open_store(settings)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def owner(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's key name; jobs belong to it. Without configured keys everyone is `anonymous`."""
    if not service.keys:
        return "anonymous"
    scheme, _, token = (authorization or "").partition(" ")
    bearer = scheme.lower() == "bearer" and bool(token.strip())
    name = identify(service.keys, token.strip()) if bearer else None
    if name is None:
        telemetry.rejected("unauthorized")
        if not authorization:
            detail = "send `Authorization: Bearer <key>`"
        elif not bearer:
            detail = "use the Bearer scheme: `Authorization: Bearer <key>`"
        else:
            detail = "unknown API key"
        raise ApiError(401, "Unauthorized", detail, {"WWW-Authenticate": "Bearer"})
    return name


Owner = Annotated[str, Depends(owner)]


def routers(service: ServiceDep, who: Owner) -> RouterRegistry:
    """The routers the caller may use: the built-in ones and those its key trained."""
    return RouterRegistry(service.artifacts, who)


Routers = Annotated[RouterRegistry, Depends(routers)]
