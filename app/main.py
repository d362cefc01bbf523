"""The HTTP gateway: accepts jobs, keeps their records in Redis, hands them to Celery, serves results.

It never imports torch; workers do the GPU work and meet the gateway only through Redis and the
artifact store. Run it with `uvicorn app.main:app` (or `make run`, which also starts a worker).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from harmonica_core.catalog import MODELS, ModelInfo

from . import metrics
from .admission import Rejected, admit_generate, admit_training
from .jobs import FINAL_STATES, Job, JobStore, new_job_id, now
from .keys import identify, load_keys
from .logs import configure_logging
from .queue import QUEUES, enqueue, make_celery
from .registry import RouterRegistry
from .schemas import GenerateRequest, JobOut, JobPage, Links, ModelOut, Problem, RouterOut, TrainRouterRequest
from .settings import Settings, get_settings

log = logging.getLogger("harmonica.gateway")
PROBLEM = "application/problem+json"
PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}
JOB_ID = re.compile(r"[0-9a-f]{32}")  # new_job_id(): uuid4 hex; anything else is no job, without asking Redis


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
        503: "Redis unreachable",
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


class Service:
    """What a request handler needs, built once at start-up from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.store = JobStore(self.redis, settings.key_prefix, settings.job_ttl_seconds)
        self.celery = make_celery(settings)
        self.keys = load_keys(settings)


class QueueCollector:
    """Queue depth and live workers, read from Redis at scrape time (no background poller)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("harmonica_queue_depth", "Jobs waiting in a Celery queue", labels=["queue"])
        workers = GaugeMetricFamily("harmonica_workers", "Live workers consuming a queue", labels=["queue"])
        try:
            alive = self.service.store.workers()
            for kind, queue in QUEUES.items():  # queued jobs, as admission counts them (not stale messages)
                depth.add_metric([queue], self.service.store.queued(kind))
                workers.add_metric([queue], sum(queue in worker["queues"] for worker in alive.values()))
        except redis.RedisError:
            return
        yield depth
        yield workers


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    configure_logging()
    service = Service(get_settings())
    app.state.service = service
    collector = QueueCollector(service)
    REGISTRY.register(collector)
    metrics.precreate_gateway_series(service.settings.model_names)
    if not service.keys:
        log.warning("no API keys configured (HARMONICA_API_KEYS): every job endpoint is open to anyone")
    try:
        yield
    finally:
        REGISTRY.unregister(collector)
        service.redis.close()


app = FastAPI(
    title="HarmoniCa Serve",
    version="0.1.0",
    description="Diffusion Transformer image generation accelerated by learned feature caching (HarmoniCa), "
    "and training of the caches' routers. Jobs are asynchronous: POST returns 202 and a Location to poll.",
    lifespan=lifespan,
)


class BodyTooLarge(Exception):
    """Raised into the app by `LimitBody`'s receive once the body passes the limit."""


class LimitBody:
    """Refuse bodies above HARMONICA_MAX_BODY_BYTES with 413: by Content-Length before reading anything, else
    (chunked) by counting what the app receives, so no body is ever buffered beyond the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = get_settings().max_body_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and not (length.isascii() and length.isdigit() and int(length) <= limit):
            return await too_large(limit)(scope, receive, send)
        received, refused, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                refused = True
                raise BodyTooLarge
            return message

        async def unless_refused(message: Message) -> None:
            nonlocal started
            if refused and not started:  # the app's own answer to BodyTooLarge (FastAPI makes it a 400)
                return
            started = True
            await send(message)

        with suppress(BodyTooLarge):
            await self.app(scope, counted, unless_refused)
        if refused and not started:
            await too_large(limit)(scope, receive, send)


def too_large(limit: int) -> JSONResponse:
    metrics.JOBS_REJECTED.labels("too_large").inc()
    return problem(413, "Request body too large", f"bodies are limited to {limit} bytes")


app.add_middleware(LimitBody)


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
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


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    metrics.JOBS_REJECTED.labels("invalid").inc()
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    errors = [field_error(e, error.body, content_type) for e in error.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors)


def allowed_methods(request: Request) -> str:
    """Every method of every route matching the path (Starlette's 405 names only the first route's)."""
    routes = request.app.router.routes
    methods = {m for r in routes if r.matches(request.scope)[0] is not Match.NONE for m in getattr(r, "methods", ())}
    return ", ".join(sorted(methods))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    headers = dict(error.headers or {})
    hint = "see /docs for the API"
    if error.status_code == 405:
        headers["Allow"] = allowed_methods(request)
        hint = f"this path allows {headers['Allow']}"
    elif error.status_code == 400:  # FastAPI's: a body it could not decode (JSON in another encoding than UTF-8)
        hint = "send the body as UTF-8 JSON"
    return problem(error.status_code, str(error.detail), f"{error.detail}: {hint}", headers)


@app.exception_handler(redis.RedisError)
async def _redis_down(_: Request, error: redis.RedisError) -> JSONResponse:
    log.error("redis error: %s", error)
    return problem(503, "Job store unavailable", "Redis is unreachable; retry shortly", {"Retry-After": "5"})


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
        metrics.JOBS_REJECTED.labels("unauthorized").inc()
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
    return RouterRegistry(service.settings.routers_dir, who)


Routers = Annotated[RouterRegistry, Depends(routers)]


def job_out(job: Job) -> JobOut:
    base = f"/jobs/{job.id}"
    result = job.result or {}
    images = [f"{base}/images/{n}" for n in range(len(result.get("images", [])))]
    router = f"/routers/{result['router_id']}" if "router_id" in result else None
    grid = f"{base}/grid" if "grid" in result else None
    links = Links(self=base, cancel=base, images=images, grid=grid, router=router)
    return JobOut(**{k: v for k, v in job.__dict__.items() if k != "owner"}, links=links)


def submit(service: Service, kind: str, who: str, request: dict[str, Any], idempotency_key: str | None,
           fingerprint: str, response: Response) -> JobOut:  # fmt: skip
    """Bind the idempotency key, then admit and enqueue the job; replays return the bound job."""
    job = Job(new_job_id(), kind, "queued", who, request["model"], request, now())
    bound_key = None if idempotency_key is None else f"{kind}:{idempotency_key}"
    if bound_key is not None:
        bound = service.store.claim_idempotency_key(who, bound_key, job.id, fingerprint)
        if bound is not None:
            bound_id, bound_fingerprint = bound
            if bound_fingerprint != fingerprint:
                raise ApiError(422, "Idempotency-Key reused", "this Idempotency-Key was used with a different body; "
                               "use a new key for a new request")  # fmt: skip
            existing = service.store.get(bound_id)
            if existing is None:
                raise ApiError(409, "Request in progress", "the first request with this key is still being accepted; "
                               "retry shortly", {"Retry-After": "1"})  # fmt: skip
            return accepted(existing, response)
    try:
        admit_and_enqueue(service, job)
    except ApiError:
        if bound_key is not None:  # refused or not enqueued: a retry with the same key must be able to succeed
            service.store.release_idempotency_key(who, bound_key)
        raise
    return accepted(job, response)


def admit_and_enqueue(service: Service, job: Job) -> None:
    """Create the record within the limits (one atomic step, so no burst gets past them) and enqueue it."""
    limits = service.settings
    refusal = service.store.admit(job, limits.max_active_jobs_per_key, limits.max_queue_depth)
    if refusal is not None:
        metrics.JOBS_REJECTED.labels(refusal).inc()
        reasons = {
            "key_busy": f"you have {limits.max_active_jobs_per_key} jobs queued or running; wait for one to end",
            "queue_full": f"the {QUEUES[job.kind]} queue holds {limits.max_queue_depth} jobs; retry later",
        }
        raise ApiError(429, "Too many jobs", reasons[refusal], {"Retry-After": "10"})
    try:
        enqueue(service.celery, job.kind, job.id)
    except Exception as error:  # broker down: the accepted record must still end in a final state
        service.store.transition(job.id, ("queued",), "failed", error={"code": "internal", "message": str(error)})
        raise ApiError(503, "Queue unavailable", "could not enqueue the job; retry shortly") from error
    metrics.JOBS_SUBMITTED.labels(job.kind, job.model).inc()
    extra = {"job_id": job.id, "kind": job.kind, "model": job.model, "owner": job.owner}
    log.info("job %s accepted", job.id, extra=extra)


def accepted(job: Job, response: Response) -> JobOut:
    response.status_code = 202
    response.headers["Location"] = f"/jobs/{job.id}"
    response.headers["Retry-After"] = "1"
    return job_out(job)


def rejected(error: Rejected) -> ApiError:
    metrics.JOBS_REJECTED.labels("invalid").inc()
    return ApiError(422, "Invalid request", str(error), errors=[{"field": error.field, "message": str(error)}])


def fingerprint(body: GenerateRequest | TrainRouterRequest) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="optional; the same key and body return the same job while job records are "
        "kept (HARMONICA_JOB_TTL_SECONDS, 7 days); the same key with another body is a 422",
    ),
]


@app.post("/generate", status_code=202, response_model=JobOut, responses=POST_RESPONSES, tags=["jobs"])
def post_generate(
    body: GenerateRequest,
    service: ServiceDep,
    who: Owner,
    registry: Routers,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Generate images; poll the returned job (Location header) until it succeeds, then fetch its images."""
    try:
        request = admit_generate(body, service.settings, registry)
    except Rejected as error:
        raise rejected(error) from None
    return submit(service, "generate", who, request, idempotency_key, fingerprint(body), response)


@app.post("/train-router", status_code=202, response_model=JobOut, responses=POST_RESPONSES, tags=["jobs"])
def post_train_router(
    body: TrainRouterRequest, service: ServiceDep, who: Owner, response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:  # fmt: skip
    """Train a router for a model, scheduler and step count; the finished job names the new router id."""
    try:
        request = admit_training(body, service.settings)
    except Rejected as error:
        raise rejected(error) from None
    return submit(service, "train_router", who, request, idempotency_key, fingerprint(body), response)


def find_job(service: Service, job_id: str, who: str) -> Job:
    job = service.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None or job.owner != who:
        raise ApiError(404, "Job not found", f"no job {job_id!r} (finished jobs are kept "
                       f"{service.settings.job_ttl_seconds // 3600} h)")  # fmt: skip
    return job


@app.get("/jobs/{job_id}", response_model=JobOut, responses=JOB_RESPONSES, tags=["jobs"])
def get_job(job_id: str, service: ServiceDep, who: Owner) -> JobOut:
    """A job's state, progress, result or error."""
    return job_out(find_job(service, job_id, who))


@app.get("/jobs", response_model=JobPage, responses=JOB_RESPONSES, tags=["jobs"])
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
    return JobPage(jobs=[job_out(job) for job in jobs], next=following)


@app.delete("/jobs/{job_id}", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, tags=["jobs"])
def cancel_job(job_id: str, service: ServiceDep, who: Owner) -> JobOut:
    """Cancel: a queued job never runs; a running one stops at its next denoising step or router update."""
    job = find_job(service, job_id, who)
    found = service.store.request_cancel(job.id)
    if found == "queued":
        metrics.JOBS_COMPLETED.labels(job.kind, job.model, "canceled").inc()
    elif found in FINAL_STATES and found != "canceled":
        raise ApiError(409, "Job already finished", f"job {job.id} already {found}; nothing to cancel")
    return job_out(find_job(service, job_id, who))


PNG_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}, **JOB_RESPONSES}


def artifact(service: Service, job: Job, name: str | None, what: str) -> FileResponse:
    if job.status != "succeeded" or name is None:
        raise ApiError(404, "Image not found", f"job {job.id} is {job.status}; it has no {what}")
    path = service.settings.job_dir(job.id) / name
    if not path.is_file():
        raise ApiError(404, "Image not found", f"{what} of job {job.id} is missing from the artifact store; "
                       "the gateway and the workers must share HARMONICA_ARTIFACTS_DIR")  # fmt: skip
    headers = {"Cache-Control": "private, max-age=86400, immutable"}
    return FileResponse(path, media_type="image/png", headers=headers)


@app.get("/jobs/{job_id}/images/{n}", response_class=FileResponse, responses=PNG_RESPONSES, tags=["jobs"])
def get_image(job_id: str, n: int, service: ServiceDep, who: Owner) -> FileResponse:
    """The n-th image (from 0) of a succeeded generation job, as PNG."""
    job = find_job(service, job_id, who)
    images = (job.result or {}).get("images", [])
    return artifact(service, job, images[n] if 0 <= n < len(images) else None, f"image {n}")


@app.get("/jobs/{job_id}/grid", response_class=FileResponse, responses=PNG_RESPONSES, tags=["jobs"])
def get_grid(job_id: str, service: ServiceDep, who: Owner) -> FileResponse:
    """All images of a succeeded generation job on one labelled sheet (a column per label or prompt)."""
    job = find_job(service, job_id, who)
    return artifact(service, job, (job.result or {}).get("grid"), "grid")


@app.get("/routers", response_model=list[RouterOut], responses=JOB_RESPONSES, tags=["routers"])
def list_routers(registry: Routers, model: str | None = None) -> list[dict[str, Any]]:
    """Built-in routers and those your key trained, with what they were trained for and their measured quality."""
    return [r.summary() for r in registry.all() if model is None or r.model == model]


@app.get("/routers/{router_id}", response_model=RouterOut, responses=JOB_RESPONSES, tags=["routers"])
def get_router(router_id: str, registry: Routers) -> dict[str, Any]:
    """A built-in router or one your key trained."""
    router = registry.get(router_id)
    if router is None:
        raise ApiError(404, "Router not found", f"no router {router_id!r}; GET /routers lists them")
    return router.summary()


@app.get("/models", response_model=list[ModelOut], responses=JOB_RESPONSES, tags=["routers"])
def list_models(service: ServiceDep, registry: Routers) -> list[ModelOut]:
    """Models this service runs, with the routers you may use for each."""
    usable = registry.all()
    out = []
    for name in service.settings.model_names:
        info = MODELS.get(name) or ModelInfo("a local diffusers pipeline folder", "unknown")
        facts = {"description": info.description, "family": info.family, "num_classes": info.num_classes,
                 "size": info.size, "max_size": info.max_size}  # fmt: skip
        out.append(ModelOut(id=name, **facts, routers=[r.id for r in usable if r.model == name]))
    return out


@app.get("/healthz", tags=["operations"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@app.get("/readyz", tags=["operations"], responses={503: JOB_RESPONSES[503]})
def readyz(service: ServiceDep) -> Any:
    """Redis answers and at least one worker is alive with a model loaded (per its heartbeat)."""
    try:
        service.redis.ping()
        workers = service.store.workers()
    except redis.RedisError as error:
        return problem(503, "Not ready", f"Redis unreachable: {error}")
    if not workers:
        return problem(503, "Not ready", "no worker is alive; start one with `python -m worker`")
    if not any(worker["models"] for worker in workers.values()):
        return problem(503, "Not ready", "workers are up but still loading their models", {"Retry-After": "5"})
    return {"status": "ready", "workers": workers}


@app.get("/metrics", tags=["operations"], response_class=Response)
def prometheus_metrics() -> Response:
    """Prometheus exposition: job counters, queue depth, live workers (workers export the rest)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
