"""The HTTP gateway: accepts jobs, keeps their records in Redis, hands them to Celery, serves results.

This module only builds the app; the routes and what they share are in `app.api`. It never imports
torch; workers do the GPU work and meet the gateway only through Redis and the artifact store
(`app.contract`). Run it with `uvicorn app.main:app` (or `make run`, which also starts workers).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import import_module
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import REGISTRY

from .api import errors, telemetry
from .api.deps import Service
from .api.limits import LimitBody
from .api.routes import health, jobs, models, routers, webhooks
from .contract.kinds import KINDS
from .contract.settings import get_settings
from .logs import configure_logging

STATIC = Path(__file__).parent / "static"  # the playground at /

log = logging.getLogger("harmonica.gateway")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    configure_logging()
    service = Service(get_settings())
    app.state.service = service
    collector = telemetry.QueueCollector(service.store)
    REGISTRY.register(collector)
    telemetry.precreate(service.settings.model_names)
    if not service.keys:
        log.warning("no API keys configured (HARMONICA_API_KEYS): every job endpoint is open to anyone")
    try:
        yield
    finally:
        REGISTRY.unregister(collector)
        service.redis.close()


app = FastAPIOffline(  # FastAPI whose /docs and /redoc load their scripts from this server, not a CDN
    title="HarmoniCa Serve",
    version="0.1.0",
    description="Diffusion Transformer image generation accelerated by learned feature caching (HarmoniCa), "
    "and training of the caches' routers. Jobs are asynchronous: POST returns 202 and a Location to poll.",
    lifespan=lifespan,
    exception_handlers=errors.handlers(),
)
app.add_middleware(LimitBody)
for route in [kind.route for kind in KINDS.values()]:  # each job kind's POST route, named by its entry
    app.include_router(import_module(f"{__package__}.api.routes.{route}").router)
for module in (jobs, routers, models, webhooks, health):
    app.include_router(module.router)
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/", include_in_schema=False)
def playground() -> FileResponse:
    """The playground: a page to generate, watch the steps, read the routers' plans and train (static files)."""
    return FileResponse(STATIC / "index.html")
