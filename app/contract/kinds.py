"""The job kinds: one entry per kind, from which both sides derive everything that names it.

Celery's routes and time limits (`queue.py`), the worker's `--queues` choices, `make run`'s workers, the
settings' time-limit checks, metric label sets and the API's `kind` field all read this table, so a
new kind is one entry here plus its settings, its request body and route, and its runner in the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings


@dataclass(frozen=True)
class JobKind:
    name: str  # the job record's `kind`, the API's and the metrics' label
    queue: str  # its own Celery queue: admission counts a kind's queued jobs as that queue's depth
    limits: str  # the prefix of its two Settings fields `<limits>_soft_time_limit` and `<limits>_time_limit`
    description: str

    @property
    def task(self) -> str:
        """The Celery task name the gateway sends and the worker registers."""
        return f"harmonica.{self.name}"

    @property
    def soft_limit(self) -> str:
        """The Settings field of the soft time limit (the job fails with `timeout`)."""
        return f"{self.limits}_soft_time_limit"

    @property
    def hard_limit(self) -> str:
        """The Settings field of the hard time limit (the pool child is killed)."""
        return f"{self.limits}_time_limit"

    def time_limits(self, settings: Settings) -> dict[str, float]:
        """Celery's task annotation for this kind's limits."""
        return {"soft_time_limit": getattr(settings, self.soft_limit), "time_limit": getattr(settings, self.hard_limit)}


KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("generate", queue="gen", limits="gen", description="image generation"),
        JobKind("train_router", queue="train", limits="train", description="router training"),
    )
}
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(kind.queue for kind in KINDS.values()))
