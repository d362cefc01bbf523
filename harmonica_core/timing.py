"""Realized speedup: wall time of plans on the same request, same process, interleaved (ALGORITHM.md §6)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from .cache.plan import CachePlan
from .models import Model
from .sampling import GenerationRequest, GenerationStats, generate


def interleaved_latencies(
    model: Model,
    runs: dict[str, tuple[GenerationRequest, CachePlan]],
    repeats: int,
    rounds: Iterable[int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, GenerationStats]]:
    """One warm-up per run, then `repeats` rounds over every run in turn, so drift hits all alike.

    Returns the seconds of each repeat and the warm-up's stats per run name.
    """
    stats = {name: generate(model, request, plan).stats for name, (request, plan) in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in rounds if rounds is not None else range(repeats):
        for name, (request, plan) in runs.items():
            seconds[name].append(generate(model, request, plan).stats.total_seconds)
    return seconds, stats


def realized_speedups(seconds: dict[str, list[float]], baseline: str) -> dict[str, float]:
    base = statistics.median(seconds[baseline])
    return {name: base / statistics.median(values) for name, values in seconds.items()}
