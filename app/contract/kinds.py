"""The job kinds: one entry per kind, from which both sides derive everything that names it.

Celery's routes and time limits (`queue.py`), the settings' time-limit fields (`settings.py`), the worker's
`--queues` choices and what runs a job (`worker/runners/<runner>.py`), `make run`'s workers, the gateway's
routes (`app/api/routes/<route>.py`), metric label sets and the API's `kind` field all read this table.
So a new kind is this entry, its gateway module (request body, admission, route) and its worker module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings


@dataclass(frozen=True)
class JobKind:
    """One kind of job.

    Attributes:
        name: the job record's `kind`, the API's and the metrics' label.
        queue: its Celery queue; admission counts a kind's queued jobs as that queue's depth.
        limits: the prefix of its Settings fields `<limits>_soft_time_limit` and `<limits>_time_limit`
            (`HARMONICA_<LIMITS>_SOFT_TIME_LIMIT`, ...); kinds may share one.
        soft_seconds, hard_seconds: those fields' defaults. Past the soft limit the job fails with `timeout`;
            past the hard one the pool child is killed.
        route: its module in `app/api/routes/` (an `APIRouter` named `router`).
        runner: its module in `worker/runners/` (`run(job, settings, report)`, or `run_batch(jobs, settings,
            reports)` where jobs can share a batch, and `CANCELLED`).
    """

    name: str
    queue: str
    limits: str
    soft_seconds: float
    hard_seconds: float
    route: str
    runner: str
    description: str

    @property
    def task(self) -> str:
        """The Celery task name the gateway sends and the worker registers."""
        return f"harmonica.{self.name}"

    @property
    def soft_limit(self) -> str:
        """The Settings field of the soft time limit."""
        return f"{self.limits}_soft_time_limit"

    @property
    def hard_limit(self) -> str:
        """The Settings field of the hard time limit."""
        return f"{self.limits}_time_limit"

    def time_limits(self, settings: Settings) -> dict[str, float]:
        """Celery's task annotation for this kind's limits."""
        return {"soft_time_limit": getattr(settings, self.soft_limit), "time_limit": getattr(settings, self.hard_limit)}


KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind(
            "generate",
            queue="gen",
            limits="gen",
            soft_seconds=300,
            hard_seconds=360,
            route="generate",
            runner="generate",
            description="image generation",
        ),
        JobKind(
            "train_router",
            queue="train",
            limits="train",
            soft_seconds=6 * 3600,
            hard_seconds=6 * 3600 + 120,
            route="train",
            runner="train",
            description="router training",
        ),
    )
}
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(kind.queue for kind in KINDS.values()))
