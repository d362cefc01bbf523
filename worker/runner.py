"""The torch side of a worker: models kept per process, and each job kind's runner (`worker/runners/`).

Imported only inside pool children (by the tasks, at run time), so the Celery parent never
initializes CUDA before it forks (serving.md §1.2).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from app.contract.jobs import Job
from app.contract.kinds import JobKind
from app.contract.settings import Settings
from harmonica_core.models import Model, load_model

from . import telemetry

Report = Callable[[dict[str, Any]], None]  # progress -> job record; raises the runner's `cancelled` to stop

_models: OrderedDict[str, Model] = OrderedDict()


def get_model(name: str, settings: Settings) -> Model:
    """Load once per process; keep at most `max_models_per_worker`, dropping the least recently used."""
    if name in _models:
        _models.move_to_end(name)
        return _models[name]
    start = time.perf_counter()
    model = load_model(name, device=settings.device)
    telemetry.record_model_load(name, time.perf_counter() - start)
    _models[name] = model
    while len(_models) > settings.max_models_per_worker:
        _models.popitem(last=False)
    return model


Outcome = dict[str, Any] | Exception  # a job's result, or why it did not get one
RunBatch = Callable[[list[Job], Settings, list[Report]], list[Outcome]]


@dataclass(frozen=True)
class Runner:
    """How a job kind runs: jobs (one, or a batch where the kind `batches`) with a `report` each, to one outcome
    each; `cancelled` is the exception a `report` raises to stop its job."""

    run_batch: RunBatch
    cancelled: type[Exception]
    batches: bool


def runner_for(kind: JobKind) -> Runner:
    """The kind's module in `worker/runners/`, named by its `JobKind.runner`: `run_batch(jobs, settings, reports)`
    where its jobs can share a batch, else `run(job, settings, report)`."""
    module = import_module(f"{__package__}.runners.{kind.runner}")
    if hasattr(module, "run_batch"):
        return Runner(module.run_batch, module.CANCELLED, batches=True)
    return Runner(_one_at_a_time(module.run), module.CANCELLED, batches=False)


def _one_at_a_time(run: Callable[[Job, Settings, Report], dict[str, Any]]) -> RunBatch:
    def run_batch(jobs: list[Job], settings: Settings, reports: list[Report]) -> list[Outcome]:
        (job,), (report,) = jobs, reports
        try:
            return [run(job, settings, report)]
        except Exception as error:
            return [error]

    return run_batch
