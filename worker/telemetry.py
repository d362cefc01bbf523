"""Every Prometheus write of the workers, in one place (the definitions are in `app.contract.metrics`).

The parent and the pool children both record through here: the parent the reconciler's recoveries and jobs
killed at the hard time limit, the children everything about the runs. Torch-free, since the parent imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from app.contract import metrics
from app.contract.jobs import FINAL_STATES, Job
from app.contract.kinds import KINDS
from app.contract.reconcile import Sweep
from harmonica_core.cache.methods import METHODS
from harmonica_core.catalog import OBJECTIVES

if TYPE_CHECKING:
    from harmonica_core.sampling import GenerationStats

OUTCOMES = ("computed", "reused")


def precreate(models: list[str]) -> None:
    """Create label sets at zero, so `rate()` counts a process's first event and panels start at 0."""
    for kind in KINDS:
        metrics.JOBS_IN_PROGRESS.labels(kind)
        metrics.REDELIVERIES.labels(kind)
        for histogram in (metrics.BATCH_JOBS, metrics.BATCH_ROWS, metrics.BATCH_WAIT):
            histogram.labels(kind)
        for reason in metrics.RECOVERY_REASONS:
            metrics.JOBS_RECOVERED.labels(kind, reason)
        for model in models:
            for histogram in (metrics.QUEUE_TIME, metrics.INFERENCE_TIME, metrics.E2E_LATENCY):
                histogram.labels(kind, model)
            for status in FINAL_STATES:
                metrics.JOBS_COMPLETED.labels(kind, model, status)
    for model in models:
        metrics.IMAGES_GENERATED.labels(model)
        metrics.MODEL_LOAD_TIME.labels(model)
        for method in METHODS:
            metrics.STEP_TIME.labels(model, method)
            metrics.THEORETICAL_SPEEDUP.labels(model, method)
            for outcome in OUTCOMES:
                metrics.BRANCH_EVALUATIONS.labels(model, method, outcome)
        for objective in OBJECTIVES:
            metrics.TRAIN_ITERATIONS.labels(model, objective)
            metrics.TRAIN_TIME.labels(model, objective)


def record_model_load(model: str, seconds: float) -> None:
    metrics.MODEL_LOAD_TIME.labels(model).observe(seconds)


def record_delivery(job: Job, deliveries: int) -> None:
    if deliveries > 1:
        metrics.REDELIVERIES.labels(job.kind).inc()


def record_start(job: Job, started_at: float) -> None:
    """The first start of a job only: a redelivered job has waited in the queue once."""
    metrics.QUEUE_TIME.labels(job.kind, job.model).observe(started_at - job.created_at)


@contextmanager
def in_progress(kind: str) -> Iterator[None]:
    gauge = metrics.JOBS_IN_PROGRESS.labels(kind)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def record_finish(job: Job, status: str, finished_at: float) -> None:
    """A job's final state, counted by the call that made it final."""
    metrics.JOBS_COMPLETED.labels(job.kind, job.model, status).inc()
    metrics.E2E_LATENCY.labels(job.kind, job.model).observe(finished_at - job.created_at)
    if job.started_at is not None:
        metrics.INFERENCE_TIME.labels(job.kind, job.model).observe(finished_at - job.started_at)


def record_generation(model: str, method: str, stats: GenerationStats, images: int) -> None:
    for seconds in stats.step_seconds:
        metrics.STEP_TIME.labels(model, method).observe(seconds)
    metrics.BRANCH_EVALUATIONS.labels(model, method, "computed").inc(stats.computed)
    metrics.BRANCH_EVALUATIONS.labels(model, method, "reused").inc(stats.reused)
    metrics.THEORETICAL_SPEEDUP.labels(model, method).observe(stats.theoretical_speedup)
    metrics.IMAGES_GENERATED.labels(model).inc(images)


def record_batch(kind: str, jobs: int, rows: int, waited: float) -> None:
    metrics.BATCH_JOBS.labels(kind).observe(jobs)
    metrics.BATCH_ROWS.labels(kind).observe(rows)
    metrics.BATCH_WAIT.labels(kind).observe(waited)


def record_training_update(model: str, objective: str, loss: float) -> None:
    metrics.TRAIN_ITERATIONS.labels(model, objective).inc()
    metrics.TRAIN_LOSS.labels(model, objective).set(loss)


def record_training(model: str, objective: str, seconds: float) -> None:
    metrics.TRAIN_TIME.labels(model, objective).observe(seconds)


def record_sweep(sweep: Sweep) -> None:
    for _, kind, reason in sweep.recovered:
        metrics.JOBS_RECOVERED.labels(kind, reason).inc()
