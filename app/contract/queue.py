"""The Celery application as both sides see it: broker, queues, routes, delivery and time limits.

The gateway only sends tasks by name; `worker.tasks` registers them. Both build the app from this
one function so the Redis transport options (the visibility timeout above all) are identical
everywhere (serving.md §1.5, §1.14). Routes and time limits come from the job kinds' table.
"""

from __future__ import annotations

from celery import Celery

from .kinds import KINDS, QUEUES
from .settings import Settings


def make_celery(settings: Settings) -> Celery:
    # Unacked jobs of a worker that died without warning come back after the visibility timeout,
    # found by a sweep every `restore_interval` seconds (kombu's default is 100 s).
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.restore_interval,
        "unacked_restore_throttle": 1,
    }
    celery = Celery("harmonica", broker=settings.redis_url)
    celery.conf.update(
        task_default_queue=QUEUES[0],  # every task has its route; this only names a queue for strays
        task_routes={kind.task: {"queue": kind.queue} for kind in KINDS.values()},
        task_ignore_result=True,  # the job record in Redis is the result
        task_acks_late=True,  # a message is acked after its job ends: a dead worker's job is delivered again
        task_reject_on_worker_lost=True,  # a killed pool child requeues; our delivery counter stops loops
        task_acks_on_failure=True,
        task_acks_on_timeout=True,
        worker_prefetch_multiplier=1,  # reserve only the running job
        # A job outlives a broker outage: the lease keeps a restored copy from running beside it, and its
        # final state is written when Redis returns (worker.tasks.finish).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_soft_shutdown_timeout=60.0,  # SIGTERM (remapped to SIGQUIT) restores unacked jobs at once
        worker_proc_alive_timeout=120.0,  # pool children import torch before they report up
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        task_annotations={kind.task: kind.time_limits(settings) for kind in KINDS.values()},
    )
    return celery


def enqueue(celery: Celery, kind: str, job_id: str) -> None:
    """Send a job's message: the task id is the job id, so every copy of a job's message names it."""
    celery.send_task(KINDS[kind].task, args=[job_id], task_id=job_id, queue=KINDS[kind].queue)
