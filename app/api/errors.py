"""Every error the API answers is RFC 9457 problem JSON: `ApiError` for the routes' own refusals, and handlers
that turn FastAPI's validation errors, Starlette's HTTP errors and Redis outages into the same shape."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import redis
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from app.contract.artifacts import StoreUnavailable

from . import telemetry
from .schemas import Problem

log = logging.getLogger("harmonica.gateway")
PROBLEM = "application/problem+json"
PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}


def problem_responses(texts: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for problem+json answers."""
    return {
        code: {"model": Problem, "description": text, "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}}}
        for code, text in texts.items()
    }


JOB_RESPONSES = problem_responses(
    {
        401: "missing or unknown API key",
        404: "no such job (or not yours)",
        409: "conflict with the job's state or an idempotency key",
        413: "request body too large",
        422: "invalid request; `errors` names the fields",
        429: "queue full, or too many active jobs for this key; retry after Retry-After seconds",
        503: "Redis or the artifact store unreachable",
    }
)
POST_RESPONSES = {**problem_responses({400: "the body could not be read (not UTF-8)"}), **JOB_RESPONSES}


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers, self.extra = status, title, detail, headers or {}, extra


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = Problem(title=title, status=status, detail=detail, **extra).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


async def api_error(_: Request, error: ApiError) -> JSONResponse:
    return problem(error.status, error.title, error.detail, error.headers, **error.extra)


def field_error(error: dict[str, Any], document: Any, content_type: str) -> dict[str, str]:
    """One validation error as the field it concerns and what to change."""
    loc = error["loc"]
    if error["type"] == "json_invalid":  # loc is ("body", character offset); the text says line and column
        where = json.JSONDecodeError(error["ctx"]["error"], document if isinstance(document, str) else "", loc[-1])
        return {"field": "body", "message": f"the body is not valid JSON: {where}"}
    if loc == ("body",):  # the body as a whole: absent, not an object, or not sent as JSON
        came = "" if content_type.endswith("json") else f" (it came as {content_type or 'no Content-Type'!r})"
        hint = f"send a JSON object with `Content-Type: application/json`{came}"
        return {"field": "body", "message": f"{error['msg']}: {hint}"}
    return {"field": ".".join(str(part) for part in loc[1:]), "message": error["msg"]}


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    telemetry.rejected("invalid")
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    errors = [field_error(e, error.body, content_type) for e in error.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors)


def endpoints(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves, also inside included routers: FastAPI 0.137 and later keep an included router as
    one entry (its `original_router`) where earlier versions copied its routes. `app.main` sets no prefix."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from (route,) if included is None else endpoints(included.routes)


def allowed_methods(request: Request) -> str:
    """Every method of every route matching the path (Starlette's 405 names only the first route's)."""
    matching = (r for r in endpoints(request.app.router.routes) if r.matches(request.scope)[0] is not Match.NONE)
    return ", ".join(sorted({method for route in matching for method in getattr(route, "methods", ())}))


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    headers = dict(error.headers or {})
    hint = "see /docs for the API"
    if error.status_code == 405:
        headers["Allow"] = allowed_methods(request)
        hint = f"this path allows {headers['Allow']}"
    elif error.status_code == 400:  # FastAPI's: a body it could not decode (JSON in another encoding than UTF-8)
        hint = "send the body as UTF-8 JSON"
    return problem(error.status_code, str(error.detail), f"{error.detail}: {hint}", headers)


async def redis_down(_: Request, error: redis.RedisError) -> JSONResponse:
    log.error("redis error: %s", error)
    return problem(503, "Job store unavailable", "Redis is unreachable; retry shortly", {"Retry-After": "5"})


async def store_down(_: Request, error: StoreUnavailable) -> JSONResponse:
    log.error("artifact store error: %s", error)
    detail = "the object store is unreachable or refuses the service; retry shortly (the gateway's log says why)"
    return problem(503, "Artifact store unavailable", detail, {"Retry-After": "10"})


def handlers() -> dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]]:
    """The exception handlers `app.main` registers (a fresh dict: FastAPI adds its defaults to it)."""
    return {
        ApiError: api_error,
        RequestValidationError: invalid,
        StarletteHTTPException: http_error,
        redis.RedisError: redis_down,
        StoreUnavailable: store_down,
    }
