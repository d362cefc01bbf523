"""The gateway's metrics, written only here: refusals, accepted jobs, jobs canceled while queued, and the queue
depth and live workers, read from Redis at scrape time (no background poller)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import redis
from prometheus_client.core import GaugeMetricFamily

from app.contract import metrics
from app.contract.jobs import FINAL_STATES, Job, JobStore
from app.contract.kinds import KINDS

Refusal = Literal["queue_full", "key_busy", "invalid", "unauthorized", "too_large"]


def precreate(models: list[str]) -> None:
    """Create label sets at zero, so `rate()` counts a process's first event and panels start at 0."""
    for kind in KINDS:
        for model in models:
            metrics.JOBS_SUBMITTED.labels(kind, model)
            for status in FINAL_STATES:
                metrics.JOBS_COMPLETED.labels(kind, model, status)
    for reason in get_args(Refusal):
        metrics.JOBS_REJECTED.labels(reason)


def rejected(reason: Refusal) -> None:
    metrics.JOBS_REJECTED.labels(reason).inc()


def submitted(job: Job) -> None:
    metrics.JOBS_SUBMITTED.labels(job.kind, job.model).inc()


def canceled_while_queued(job: Job) -> None:
    """A queued job ends here, not on a worker, so the gateway counts its final state."""
    metrics.JOBS_COMPLETED.labels(job.kind, job.model, "canceled").inc()


class QueueCollector:
    """Queue depth and live workers per queue, for `/metrics`."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("harmonica_queue_depth", "Jobs waiting in a Celery queue", labels=["queue"])
        workers = GaugeMetricFamily("harmonica_workers", "Live workers consuming a queue", labels=["queue"])
        try:
            alive = self.store.workers()
            for kind in KINDS.values():  # queued jobs, as admission counts them (not stale messages)
                depth.add_metric([kind.queue], self.store.queued(kind.name))
                workers.add_metric([kind.queue], sum(kind.queue in worker["queues"] for worker in alive.values()))
        except redis.RedisError:
            return
        yield depth
        yield workers
