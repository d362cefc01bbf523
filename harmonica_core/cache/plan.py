"""The cache plan: a static [steps x branches] table of compute/reuse decisions (ALGORITHM.md §2, §6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CachePlan:
    """`compute[k][i]` is True where branch i runs at step k, False where its cached output is reused.

    Plain Python tuples, so the per-branch decision during sampling is a list lookup.
    """

    compute: tuple[tuple[bool, ...], ...]
    forecast: int = 0  # what a reused branch returns: its last output (0), or a forecast of this order

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
    def from_rows(cls, rows: Sequence[Sequence[bool]], forecast: int = 0) -> CachePlan:
        return cls(tuple(tuple(bool(c) for c in row) for row in rows), forecast)
