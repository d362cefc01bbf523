"""The worker's Celery app: shared configuration from `app.contract.queue`, plus what the parent process does.

The parent (never the pool children) serves Prometheus metrics merged from the children's files
(multiprocess mode), writes a heartbeat to Redis that `/readyz` and `harmonica_workers` read, and
takes its turn running the reconciler (`app.contract.reconcile`) and the deletion of expired jobs' files.
It does not import torch: the children load the models (`worker.runner`, imported at their start) and
Celery imports `worker.tasks`, which registers the tasks on this app.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

import redis
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from app.contract.artifacts import open_store
from app.contract.jobs import JobStore
from app.contract.queue import enqueue, make_celery
from app.contract.reconcile import Reconciler, delete_expired_artifacts
from app.contract.settings import get_settings
from app.contract.webhooks import Deliverer
from app.logs import configure_logging

from . import telemetry

log = logging.getLogger("harmonica.worker")
settings = get_settings()
celery = make_celery(settings)
celery.conf.imports = ["worker.tasks"]
store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix, settings.job_ttl_seconds)
_stop = threading.Event()
WEBHOOK_INTERVAL = 0.5  # seconds between looks for due webhooks


def _heartbeat(name: str, queues: list[str]) -> None:
    interval = settings.worker_heartbeat_seconds
    while True:
        try:
            store.heartbeat(name, queues, 3 * interval)
        except redis.RedisError as error:
            log.warning("heartbeat failed: %s", error)
        if _stop.wait(interval):
            return


def _reconcile() -> None:
    """Sweep for lost jobs when this worker holds the turn; delete expired jobs' files now and then."""
    reconciler = Reconciler(store, settings, lambda kind, job_id: enqueue(celery, kind, job_id))
    next_retention = 0.0
    while not _stop.wait(settings.reconcile_interval):
        try:
            sweep = reconciler.sweep_if_due()
            if sweep is not None:
                telemetry.record_sweep(sweep)
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + settings.retention_interval
                scratch, min_age = settings.artifacts_dir / "jobs", settings.retention_interval
                removed = delete_expired_artifacts(store, open_store(settings), scratch, min_age)
                if removed:
                    log.info("deleted the files of %d expired jobs", len(removed))
        except Exception as error:  # Redis away, a broken message: the next turn tries again
            log.warning("reconciler sweep failed: %s", error)


def _webhooks() -> None:
    """Deliver the webhooks that are due, in the parent: the pool processes never wait for a receiver."""
    deliverer = Deliverer(store, settings)
    while not _stop.wait(WEBHOOK_INTERVAL):
        try:
            deliverer.deliver_due()
        except Exception as error:  # Redis away: the next turn tries again
            log.warning("webhook delivery failed: %s", error)


@setup_logging.connect
def _logging(loglevel: str | int | None = None, **_: object) -> None:
    """JSON lines instead of Celery's own format (connecting this signal replaces Celery's setup)."""
    configure_logging(loglevel)


@worker_init.connect
def _name_for_children(sender, **_: object) -> None:  # type: ignore[no-untyped-def]
    """Before the pool forks: children inherit the node name to report their loaded models under."""
    os.environ["HARMONICA_WORKER_NAME"] = sender.hostname


@worker_ready.connect
def _start(sender, **_: object) -> None:  # type: ignore[no-untyped-def]
    """Metrics endpoint and heartbeat, in the parent once the pool is up."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    port = int(os.environ.get("HARMONICA_WORKER_METRICS_PORT", "9101"))
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=settings.worker_metrics_host, registry=registry)
    queues = sorted(queue.name for queue in sender.app.amqp.queues.consume_from.values())
    name = sender.hostname or socket.gethostname()
    threading.Thread(target=_heartbeat, args=(name, queues), daemon=True).start()
    threading.Thread(target=_reconcile, daemon=True).start()
    if settings.webhook_secret:
        threading.Thread(target=_webhooks, daemon=True).start()
    where = f"{settings.worker_metrics_host}:{port}"
    log.info("worker %s consuming %s; metrics on %s/metrics", name, ",".join(queues), where)


@worker_shutdown.connect
def _stop_heartbeat(sender, **_: object) -> None:  # type: ignore[no-untyped-def]
    _stop.set()
    with contextlib.suppress(redis.RedisError):
        store.forget_worker(sender.hostname)


@worker_process_init.connect
def _preload(**_: object) -> None:
    """Load the served models in each pool child before its first job, and compile them in the compiled mode, so
    jobs never pay for either."""
    import torch

    from harmonica_core.execution import warm_up
    from harmonica_core.graphs import GRAPHS

    from .runner import get_model

    telemetry.precreate(settings.model_names)
    GRAPHS.limit_bytes = settings.graph_memory_mb * 2**20
    threads, mode = torch.get_num_threads(), settings.execution_mode
    log.info("pool process %d: %d torch threads, %s mode", os.getpid(), threads, mode)
    loaded = {}
    for name in settings.model_names[: settings.max_models_per_worker]:
        try:
            model = get_model(name, settings)
            warm_up(model, settings.execution_mode)
            loaded[name] = model.fingerprint
        except Exception as error:  # a job for it will fail with the reason; the worker still serves others
            log.warning("could not preload model %s: %s", name, error)
    name = os.environ.get("HARMONICA_WORKER_NAME", socket.gethostname())
    store.mark_loaded(name, loaded, 3 * settings.worker_heartbeat_seconds)


@worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: object) -> None:
    from prometheus_client import multiprocess

    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
