"""A Delta-DiT-style static schedule (Chen et al., "Δ-DiT", arXiv 2406.01125): training-free, by stage.

Δ-DiT observes that the rear blocks of a DiT mostly add detail, which early (noisy) steps do not need,
and the front blocks mostly set the outline, which late steps no longer change; so it reuses the rear
blocks' work in early steps and the front blocks' in late steps. Here: step 0 and every `interval`-th
step compute every branch (the cache refresh); on the other steps of the first half of sampling the
branches of the last m blocks reuse their cached outputs, on those of the second half the branches of
the first m blocks do, with m the block count whose plan comes closest to the target cache usage.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidRequest
from .plan import CachePlan

TOLERANCE = 0.05  # how far below the target usage the closest plan may land


def check_delta(steps: int, interval: int, usage: float) -> None:
    """Refuse settings no layout can satisfy (torch-free, before any model loads): between full steps every
    `interval`, reusing every block reaches the share of steps that are not full."""
    if interval < 2:
        raise InvalidRequest("interval", f"the delta schedule needs interval >= 2 (1 is every step), got {interval}")
    most = sum(k % interval != 0 for k in range(steps)) / steps
    if most < usage - TOLERANCE:
        raise InvalidRequest(
            "usage",
            f"the delta schedule reaches at most {most:.0%} cache usage at interval {interval} and {steps} steps; "
            "lower the usage or raise the interval",
        )


def delta_plan(steps: int, layout: Sequence[str], usage: float, interval: int = 2) -> CachePlan:
    """The plan for branches named `<block>.<kind>` (the model's branch layout) at a target usage rate."""
    check_delta(steps, interval, usage)
    block_of = [int(name.split(".", 1)[0]) for name in layout]
    blocks = sorted(set(block_of))

    def plan(m: int) -> CachePlan:
        early, late = set(blocks[len(blocks) - m :]), set(blocks[:m])
        rows = []
        for k in range(steps):
            reused = set() if k % interval == 0 else early if k < steps / 2 else late
            rows.append([block not in reused for block in block_of])
        return CachePlan.from_rows(rows)

    return min((plan(m) for m in range(1, len(blocks) + 1)), key=lambda p: abs(p.cache_usage_rate - usage))
