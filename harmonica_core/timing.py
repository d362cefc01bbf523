"""Realized speedup: wall time of plans on the same request, same process, interleaved (ALGORITHM.md §6)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from .cache.plan import CachePlan
from .execution import DEFAULT_MODE
from .models import Model
from .sampling import GenerationRequest, GenerationStats, generate


@dataclass(frozen=True)
class Run:
    """One timed generation: a request, its plan and the execution mode that runs it."""

    request: GenerationRequest
    plan: CachePlan
    mode: str = DEFAULT_MODE


def interleaved_latencies(
    model: Model, runs: dict[str, Run], repeats: int, rounds: Iterable[int] | None = None
) -> tuple[dict[str, list[float]], dict[str, GenerationStats]]:
    """One warm-up per run, then `repeats` rounds over every run in turn, so drift hits all alike.

    Returns the seconds of each repeat and the warm-up's stats per run name.
    """
    stats = {name: generate(model, run.request, run.plan, mode=run.mode).stats for name, run in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in rounds if rounds is not None else range(repeats):
        for name, run in runs.items():
            seconds[name].append(generate(model, run.request, run.plan, mode=run.mode).stats.total_seconds)
    return seconds, stats


def realized_speedups(seconds: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Each run's speedup over `baseline`: the median over rounds of the baseline's seconds over the run's in the
    same round. A round times every run back to back, so the ratio cancels what moves whole rounds on a shared
    machine (10-20 % between rounds here), which a ratio of medians over all rounds keeps."""
    base = seconds[baseline]
    return {
        name: statistics.median(b / v for b, v in zip(base, values, strict=True)) for name, values in seconds.items()
    }
