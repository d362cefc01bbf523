"""Cache plans and the factories that make them: none, fora, l2c, harmonica (ALGORITHM.md §2, §5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep this module torch-free for light importers
    from .router import Router


@dataclass(frozen=True)
class CachePlan:
    """A static [steps x branches] table: `compute[k][i]` is True where branch i runs at step k.

    Plain Python tuples, so the per-branch decision during sampling is a list lookup.
    """

    compute: tuple[tuple[bool, ...], ...]

    def __post_init__(self) -> None:
        widths = {len(row) for row in self.compute}
        if len(widths) > 1:
            raise ValueError("every plan row must have the same number of branches")

    @property
    def steps(self) -> int:
        return len(self.compute)

    @property
    def branches(self) -> int:
        return len(self.compute[0]) if self.compute else 0

    @property
    def reused(self) -> list[list[bool]]:
        return [[not c for c in row] for row in self.compute]

    @property
    def cache_usage_rate(self) -> float:
        """Reused branch evaluations / (T x N), as planned (ALGORITHM.md §6)."""
        total = self.steps * self.branches
        return sum(row.count(False) for row in self.compute) / total if total else 0.0

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[bool]]) -> CachePlan:
        return cls(tuple(tuple(bool(c) for c in row) for row in rows))


def none_plan(steps: int, branches: int) -> CachePlan:
    """Compute everything (the reference)."""
    return CachePlan.from_rows([[True] * branches for _ in range(steps)])


def fora_plan(steps: int, branches: int, interval: int = 2) -> CachePlan:
    """FORA: compute all branches every `interval`-th step (0, n, 2n, ...), reuse all in between."""
    if interval < 1:
        raise ValueError(f"the FORA interval must be >= 1, got {interval}")
    return CachePlan.from_rows([[k % interval == 0] * branches for k in range(steps)])


def harmonica_plan(router: Router, threshold: float = 0.1) -> CachePlan:
    """HarmoniCa: compute branch i at step k iff sigmoid(P[k, i]) > threshold; step 0 always computes."""
    return router.plan(threshold)


def l2c_plan(router: Router, threshold: float = 0.1) -> CachePlan:
    """Learning-to-Cache: odd steps (1st, 3rd, ...) run in full, the others follow the router."""
    routed = router.plan(threshold).compute
    return CachePlan.from_rows([[True] * len(row) if k % 2 == 0 else row for k, row in enumerate(routed)])


METHODS: dict[str, str] = {
    "none": "no caching: every branch computes at every step",
    "fora": "FORA: all branches every n-th step (--interval n), reused in between",
    "l2c": "Learning-to-Cache: alternate full steps and router-decided steps (needs an l2c router)",
    "harmonica": "HarmoniCa: a learned router decides each branch at each step (needs a router)",
}
NEEDS_ROUTER = frozenset({"l2c", "harmonica"})


def make_plan(
    method: str,
    steps: int,
    branches: int,
    *,
    router: Router | None = None,
    threshold: float = 0.1,
    interval: int = 2,
) -> CachePlan:
    """One entry for every method name in `METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in NEEDS_ROUTER:
        if router is None:
            raise ValueError(f"method {method!r} needs a router (train one with `harmonica train-router`)")
        factory: Callable[[Router, float], CachePlan] = harmonica_plan if method == "harmonica" else l2c_plan
        return factory(router, threshold)
    if method == "fora":
        return fora_plan(steps, branches, interval)
    return none_plan(steps, branches)
