"""The Celery tasks, one per job kind, and the delivery protocol they share.

A message carries only the job id; the job record in Redis says what to do. Each delivery:
counts itself (past `max_deliveries` the job fails instead of looping on a poison job), takes the
job's lease (so a duplicate delivery never runs beside a live copy), moves the record to `running`
unless it is final already (a canceled queued job never runs), runs, and writes exactly one final
state. Progress and cancellation travel through the core's callbacks.

Redis may go away mid-job (a restart): the job runs on without progress writes, and its final
state is retried with backoff until Redis returns. A run that finds its lease taken by another
holder (the reconciler gave the job to another worker while this one was cut off) stops without
writing anything, so a job is never finished by two runs.

The tasks come from the job kinds' table (`app.contract.kinds`); what each runs is its module in
`worker/runners/`, imported in the pool child when a job arrives, so the parent never imports torch.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack, suppress
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Task

from app.contract.jobs import ACTIVE_STATES, Job, JobStore, now
from app.contract.kinds import KINDS, JobKind
from app.contract.settings import Settings, get_settings
from harmonica_core.errors import RankFailed

from . import telemetry
from .celery_app import celery, store

if TYPE_CHECKING:
    from .runner import Outcome, Report, Runner

log = logging.getLogger("harmonica.worker")
T = TypeVar("T")


class LeaseLost(Exception):
    """Another holder has this job's lease: this run must stop and write nothing."""


class JobTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Runs in the worker's parent after a hard time limit killed the child: the job must still end."""
        job = persist(lambda: store.get(task_id)) if isinstance(exc, TimeLimitExceeded) else None
        if job is not None:
            finish(job, "failed", error={"code": "timeout", "message": f"killed at the hard time limit ({exc})"})


def persist(write: Callable[[], T]) -> T:
    """Run a Redis call, retrying with exponential backoff (0.1 s to 5 s) while Redis is unreachable, for at
    most HARMONICA_REDIS_RETRY_SECONDS."""
    deadline = time.monotonic() + get_settings().redis_retry_seconds
    delay = 0.1
    while True:
        try:
            return write()
        except redis.ConnectionError as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("redis unreachable (%s); retrying in %.1f s", error, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)


class Lease:
    """Holds the job's lease and renews it from a thread while the job runs.

    A renewal that meets a Redis error tries again at the next tick; one that finds another holder
    marks the lease lost, which stops the run at its next progress report.
    """

    def __init__(self, store: JobStore, job_id: str, seconds: float, token: str | None = None) -> None:
        self.store, self.job_id, self.seconds = store, job_id, seconds
        self.token = token or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def acquire(self) -> bool:
        if not self.store.acquire_lease(self.job_id, self.token, self.seconds):
            return False
        self._thread.start()
        return True

    def adopt(self) -> Lease:
        """Renew a lease that `JobStore.claim_batch` took under this token."""
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.token, self.seconds):
                    self.lost = True
                    log.warning("job %s: lease taken by another holder; stopping this run", self.job_id)
                    return
            except redis.RedisError as error:
                log.warning("job %s: lease renewal failed (%s); retrying", self.job_id, error)

    def release(self) -> None:
        self._stop.set()
        with suppress(redis.RedisError):  # unreachable: the lease expires by itself
            self.store.release_lease(self.job_id, self.token)


def position(progress: dict[str, Any]) -> float:
    """How far a progress report is: steps or updates done, plus a fraction for the lambda passes that
    follow an update count before the next update."""
    done = progress.get("step", progress.get("iteration", 0))
    return done + progress.get("lambda_pass", 0) / (progress.get("lambda_passes", 0) + 1)


def reporter(store: JobStore, job: Job, lease: Lease, cancel_error: type[Exception]) -> Report:
    """Progress callback: checks the cancel flag and the lease each call, and writes the progress (the record's
    and one event in the job's log: `JobStore.report_progress`).

    Progress never goes backwards: a redelivered job replays from its start or its last checkpoint,
    and its record keeps the furthest step or iteration reached until the rerun passes it. While
    Redis is unreachable the job runs on unreported (and cannot be canceled).
    """
    furthest = position(job.progress)

    def report(progress: dict[str, Any]) -> None:
        nonlocal furthest
        if lease.lost:
            raise LeaseLost(job.id)
        try:
            if store.cancel_requested(job.id):
                raise cancel_error(f"job {job.id} canceled")
            done = position(progress)
            if done > furthest:
                store.report_progress(job.id, progress)
                furthest = done
        except redis.RedisError as error:
            log.warning("job %s: progress not written (%s)", job.id, error)

    return report


def finish(job: Job, status: str, **fields: Any) -> None:
    """Write the final state once (retried while Redis is away); count and time it only if this call made it
    final."""
    finished_at = now()
    found = persist(lambda: store.transition(job.id, ACTIVE_STATES, status, finished_at=finished_at, **fields))
    if found not in ACTIVE_STATES:
        return
    telemetry.record_finish(job, status, finished_at)
    extra = {"job_id": job.id, "kind": job.kind, "model": job.model, "status": status, "error": fields.get("error")}
    log.info("job %s %s", job.id, status, extra=extra)


def execute(task: Task, job_id: str, runner: Runner) -> None:
    settings = get_settings()
    job = store.get(job_id)
    if job is None or job.final:  # expired, canceled while queued, or a late duplicate of a finished job
        log.info("job %s: nothing to run (%s)", job_id, "no record" if job is None else job.status)
        return
    lease = Lease(store, job_id, settings.lease_seconds)
    if not lease.acquire():  # a live copy runs it, or a dead worker's lease has yet to expire
        raise task.retry(countdown=settings.lease_seconds, max_retries=None)
    try:
        deliveries = store.count_delivery(job_id)
        telemetry.record_delivery(job, deliveries)
        if deliveries > settings.max_deliveries:
            why = f"delivered {deliveries} times: its worker died each time (out of memory?); not retried again"
            finish(job, "failed", error={"code": "redelivery_limit", "message": why})
            return
        if store.cancel_requested(job_id):
            finish(job, "canceled")
            return
        started_at = job.started_at or now()
        if store.transition(job_id, ACTIVE_STATES, "running", started_at=started_at) not in ACTIVE_STATES:
            return  # canceled (or gone) since the look above
        if job.started_at is None:
            telemetry.record_start(job, started_at)
            job.started_at = started_at
        batch: list[tuple[Job, Lease]] = [(job, lease)]
        waited = 0.0
        if runner.batches and job.batch_key and settings.max_batch_rows > job.batch_rows:
            companions, waited = gather(job, lease.token, settings)
            batch += [
                (companion, Lease(store, companion.id, settings.lease_seconds, lease.token).adopt())
                for companion in companions
            ]
        try:
            again = run(batch, runner, settings, waited)
        finally:
            for _, companion_lease in batch[1:]:
                companion_lease.release()
    finally:
        lease.release()
    if again:  # a rank of its distributed training died: the next delivery resumes from the checkpoint
        raise task.retry(countdown=1, max_retries=None)


def gather(job: Job, token: str, settings: Settings) -> tuple[list[Job], float]:
    """Companions for `job`'s batch: the compatible queued jobs there are now, then, while some came and rows are
    left, those that arrive within HARMONICA_BATCH_WAIT_MS. A job with no compatible job queued starts at once.
    Returns the companions (each leased under `token`, running, one delivery further) and the seconds waited."""
    start = time.monotonic()
    deadline, rows, companions = start + settings.batch_wait_ms / 1000, settings.max_batch_rows - job.batch_rows, []
    while rows > 0:
        for job_id in store.claim_batch(job.batch_key, rows, token, settings.lease_seconds):
            companion = store.get(job_id)
            if companion is None:
                continue
            rows -= companion.batch_rows
            telemetry.record_delivery(companion, companion.deliveries)
            if companion.deliveries > settings.max_deliveries:
                why = f"delivered {companion.deliveries} times: its workers died each time; not retried again"
                finish(companion, "failed", error={"code": "redelivery_limit", "message": why})
                store.release_lease(companion.id, token)
                continue
            if companion.deliveries == 1:
                telemetry.record_start(companion, companion.started_at or now())
            companions.append(companion)
        if not companions or time.monotonic() >= deadline:
            break
        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    return companions, time.monotonic() - start


def run(batch: list[tuple[Job, Lease]], runner: Runner, settings: Settings, waited: float) -> bool:
    """Run the batch's jobs together (one job where the kind does not batch) and give each its final state; True
    where the (lone) job must be delivered again instead."""
    jobs = [job for job, _ in batch]
    reports = [reporter(store, job, lease, runner.cancelled) for job, lease in batch]
    with ExitStack() as running:
        for job in jobs:
            running.enter_context(telemetry.in_progress(job.kind))
        outcomes = runner.run_batch(jobs, settings, reports)
    shared = None
    if runner.batches:
        shared = {"jobs": len(jobs), "rows": sum(job.batch_rows for job in jobs), "wait_s": round(waited, 4)}
        telemetry.record_batch(jobs[0].kind, shared["jobs"], shared["rows"], waited)
    if len(jobs) == 1 and isinstance(outcomes[0], RankFailed):
        log.warning("job %s: %s; delivering it again", jobs[0].id, outcomes[0])
        return True
    for job, outcome in zip(jobs, outcomes, strict=True):
        conclude(job, outcome, runner.cancelled, shared)
    return False


def conclude(job: Job, outcome: Outcome, cancelled: type[Exception], batch: dict[str, Any] | None) -> None:
    """The job's final state from its outcome: a result, or the exception that stopped it."""
    if isinstance(outcome, LeaseLost):
        log.warning("job %s: stopped, another run holds it now", job.id)
    elif isinstance(outcome, cancelled):
        finish(job, "canceled")
    elif isinstance(outcome, SoftTimeLimitExceeded):
        finish(job, "failed", error={"code": "timeout", "message": "the job ran past its soft time limit"})
    elif isinstance(outcome, (ValueError, FileNotFoundError)):  # what the core raises for requests it cannot run
        finish(job, "failed", error={"code": "invalid_request", "message": str(outcome)})
    elif isinstance(outcome, Exception):
        log.error("job %s failed", job.id, exc_info=outcome)
        finish(job, "failed", error={"code": "internal", "message": f"{type(outcome).__name__}: {outcome}"})
    else:
        finish(job, "succeeded", result=outcome if batch is None else outcome | {"batch": batch})


def register(kind: JobKind) -> Task:
    """The kind's Celery task; its runner is looked up in the pool child when a job arrives."""

    def run_job(self: Task, job_id: str) -> None:
        from .runner import runner_for

        execute(self, job_id, runner_for(kind))

    return celery.task(name=kind.task, bind=True, base=JobTask)(run_job)


TASKS: dict[str, Task] = {name: register(kind) for name, kind in KINDS.items()}
