"""The HTTP gateway: accepts jobs, keeps their records in Redis, hands them to Celery, serves results.

It never imports torch; workers do the GPU work and meet the gateway only through Redis and the
artifact store. Run it with `uvicorn app.main:app` (or `make run`, which also starts a worker).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from harmonica_core.catalog import MODELS, ModelInfo

from . import metrics
from .admission import Rejected, admit_generate, admit_training
from .jobs import FINAL_STATES, Job, JobStore, new_job_id, now
from .keys import identify, load_keys
from .logs import configure_logging
from .queue import QUEUES, TASKS, make_celery
from .registry import RouterRegistry
from .schemas import GenerateRequest, JobOut, JobPage, Links, ModelOut, Problem, RouterOut, TrainRouterRequest
from .settings import Settings, get_settings

log = logging.getLogger("harmonica.gateway")
PROBLEM = "application/problem+json"
PROBLEM_SCHEMA = {"$ref": "#/components/schemas/Problem"}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text, "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}}}
    for code, text in {
        401: "missing or unknown API key",
        404: "no such job (or not yours)",
        409: "conflict with the job's state or an idempotency key",
        413: "request body too large",
        422: "invalid request; `errors` names the fields",
        429: "queue full, or too many active jobs for this key; retry after Retry-After seconds",
        503: "Redis unreachable",
    }.items()
}


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
        self.registry = RouterRegistry(settings.routers_dir)
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
            for queue in QUEUES.values():
                depth.add_metric([queue], self.service.redis.llen(queue))
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


@app.middleware("http")
async def limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
    """Refuse bodies above HARMONICA_MAX_BODY_BYTES (413): by Content-Length when sent, else by reading."""
    limit = get_settings().max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        too_large = not length.isdigit() or int(length) > limit
    else:
        too_large = request.method in {"POST", "PUT", "PATCH"} and len(await request.body()) > limit
    if too_large:
        metrics.JOBS_REJECTED.labels("too_large").inc()
        return problem(413, "Request body too large", f"bodies are limited to {limit} bytes")
    return await call_next(request)


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return problem(error.status, error.title, error.detail, error.headers, **error.extra)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    metrics.JOBS_REJECTED.labels("invalid").inc()
    errors = [
        {"field": ".".join(str(part) for part in e["loc"][1:]) or "body", "message": e["msg"]} for e in error.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    detail = f"{error.detail}: see /docs for the API"
    return problem(error.status_code, str(error.detail), detail, dict(error.headers or {}))  # keeps 405's Allow


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
    name = identify(service.keys, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if name is None:
        metrics.JOBS_REJECTED.labels("unauthorized").inc()
        detail = "send `Authorization: Bearer <key>`" if not authorization else "unknown API key"
        raise ApiError(401, "Unauthorized", detail, {"WWW-Authenticate": "Bearer"})
    return name


Owner = Annotated[str, Depends(owner)]


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
    """Create the record, bind the idempotency key, enqueue; replays return the bound job."""
    queue = QUEUES[kind]
    job = Job(new_job_id(), kind, "queued", who, request["model"], request, now())
    if idempotency_key is not None:
        bound = service.store.claim_idempotency_key(who, f"{kind}:{idempotency_key}", job.id, fingerprint)
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
    limits = service.settings
    refusal = None
    if service.store.active(who) >= limits.max_active_jobs_per_key:
        refusal = "key_busy", f"you have {limits.max_active_jobs_per_key} jobs queued or running; wait for one to end"
    elif service.redis.llen(queue) >= limits.max_queue_depth:
        refusal = "queue_full", f"the {queue} queue holds {limits.max_queue_depth} jobs; retry later"
    if refusal is not None:
        if idempotency_key is not None:
            service.store.release_idempotency_key(who, f"{kind}:{idempotency_key}")
        metrics.JOBS_REJECTED.labels(refusal[0]).inc()
        raise ApiError(429, "Too many jobs", refusal[1], {"Retry-After": "10"})
    service.store.create(job)
    try:
        service.celery.send_task(TASKS[kind], args=[job.id], task_id=job.id, queue=queue)
    except Exception as error:  # broker down: the accepted record must still end in a final state
        service.store.transition(job.id, ("queued",), "failed", error={"code": "internal", "message": str(error)})
        raise ApiError(503, "Queue unavailable", "could not enqueue the job; retry shortly") from error
    metrics.JOBS_SUBMITTED.labels(kind, job.model).inc()
    log.info("job %s accepted", job.id, extra={"job_id": job.id, "kind": kind, "model": job.model, "owner": who})
    return accepted(job, response)


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


@app.post("/generate", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, tags=["jobs"])
def post_generate(
    body: GenerateRequest, service: ServiceDep, who: Owner, response: Response, idempotency_key: IdempotencyKey = None
) -> JobOut:
    """Generate images; poll the returned job (Location header) until it succeeds, then fetch its images."""
    try:
        request = admit_generate(body, service.settings, service.registry)
    except Rejected as error:
        raise rejected(error) from None
    return submit(service, "generate", who, request, idempotency_key, fingerprint(body), response)


@app.post("/train-router", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, tags=["jobs"])
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
    job = service.store.get(job_id) if len(job_id) <= 64 else None
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
    cursor: Annotated[float | None, Query(description="from the previous page's `next` link")] = None,
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


@app.get("/routers", response_model=list[RouterOut], tags=["routers"])
def list_routers(service: ServiceDep, model: str | None = None) -> list[dict[str, Any]]:
    """Built-in and trained routers, with what they were trained for and their measured quality."""
    return [r.summary() for r in service.registry.all() if model is None or r.model == model]


@app.get("/routers/{router_id}", response_model=RouterOut, responses=JOB_RESPONSES, tags=["routers"])
def get_router(router_id: str, service: ServiceDep) -> dict[str, Any]:
    router = service.registry.get(router_id)
    if router is None:
        raise ApiError(404, "Router not found", f"no router {router_id!r}; GET /routers lists them")
    return router.summary()


@app.get("/models", response_model=list[ModelOut], tags=["routers"])
def list_models(service: ServiceDep) -> list[ModelOut]:
    """Models this service runs, with the routers trained for each."""
    routers = service.registry.all()
    out = []
    for name in service.settings.model_names:
        info = MODELS.get(name) or ModelInfo("a local diffusers pipeline folder", "unknown")
        facts = {"description": info.description, "family": info.family, "num_classes": info.num_classes,
                 "size": info.size, "max_size": info.max_size}  # fmt: skip
        out.append(ModelOut(id=name, **facts, routers=[r.id for r in routers if r.model == name]))
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
