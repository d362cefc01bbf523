"""The cache plan: a static [steps x branches] table of compute/reuse decisions (ALGORITHM.md §2, §6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ForecastWeights = tuple[tuple[tuple[float, ...], ...], ...]  # [step][branch][level - 1]: a forecast's learned weights


@dataclass(frozen=True)
class CachePlan:
    """`compute[k][i]` is True where branch i runs at step k, False where its cached output is reused.

    Plain Python tuples, so the per-branch decision during sampling is a list lookup.
    """

    compute: tuple[tuple[bool, ...], ...]
    forecast: int = 0  # what a reused branch returns: its last output (0), or a forecast of this order
    # the weight of each Newton term of the forecast per step and branch (`hooks.ForecastReuse`), learned with a
    # router for its order; None: the plain forecast
    forecast_weights: ForecastWeights | None = None

    def __post_init__(self) -> None:
        widths = {len(row) for row in self.compute}
        if len(widths) > 1:
            raise ValueError("every plan row must have the same number of branches")
        weights = self.forecast_weights
        if weights is not None and (len(weights), len(weights[0]), len(weights[0][0])) != (
            self.steps, self.branches, self.forecast
        ):  # fmt: skip
            raise ValueError(f"forecast weights must be {self.steps} x {self.branches} x {self.forecast} (the order)")

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

    @property
    def reuses_before_computing(self) -> bool:
        """Whether a branch is reused at a step before any step computed it (execution then computes it there)."""
        seen = [False] * self.branches
        for row in self.compute:
            if any(not c and not s for c, s in zip(row, seen, strict=True)):
                return True
            seen = [c or s for c, s in zip(row, seen, strict=True)]
        return False

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Sequence[bool]],
        forecast: int = 0,
        weights: Sequence[Sequence[Sequence[float]]] | None = None,
    ) -> CachePlan:
        frozen = None if weights is None else tuple(tuple(tuple(map(float, w)) for w in row) for row in weights)
        return cls(tuple(tuple(bool(c) for c in row) for row in rows), forecast, frozen)
