"""CUDA graphs per plan step (the `graphs` execution mode).

On a GPU a DiT step launches hundreds of small kernels, and a reused branch removes arithmetic but few
launches. A plan is static, so every step of a generation is known before it runs: each whole step (the CFG
batch, the compiled blocks of that step's compute/reuse pattern, guidance and the scheduler's update) is
captured once as a CUDA graph, and a generation replays them in order, so a step is one launch whatever it
computes (README, "Speed", has what that gained over graphs of the transformer alone: little).

A graph reads and writes fixed addresses, so each shape (latents, CFG, text length, dtype) gets one `GraphSet`
of static buffers: the latents (updated in place by every step); the text context, the guidance scale and every
step's modulations (`Modulations`, one per number of steps), copied in per generation; and one buffer per branch
holding its cached output (written where a step computes the branch, read where one reuses it). A `Trajectory`
is the graphs of every step of one (plan, scheduler) on that shape, with the copy of the scheduler that was
stepped while capturing: a multistep scheduler's history lives at addresses in the graphs' memory pool that one
step writes and the next reads, so a trajectory is replayed only in order, from its first step. One pool serves
all trajectories of a shape. Sets are evicted least recently used when their memory passes
`GraphCache.limit_bytes`; a set keeps every trajectory captured on it until then.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .models import Model

log = logging.getLogger("harmonica.graphs")

DEFAULT_GRAPH_MEMORY_MB = 4096

# one denoising step: (scheduler, latents, step index, the transformer's forward, guidance scale) -> new latents
DenoiseStep = Callable[[Any, torch.Tensor, int, Callable[[torch.Tensor, int], torch.Tensor], Any], torch.Tensor]


class Replayable(Protocol):
    def replay(self) -> None: ...


@dataclass
class Trajectory:
    """The captured steps of one (plan, scheduler) on one shape, replayed in order."""

    steps: list[Replayable]
    scheduler: Any  # the copy stepped while capturing: it keeps the history the graphs share alive


@dataclass
class Modulations:
    """Every block's and the final layer's modulation at every step of a T-step generation: inputs of all the
    shape's trajectories of T steps, copied in once per generation."""

    blocks: torch.Tensor  # [T, blocks, parts, rows, 1, D]
    head: torch.Tensor  # [T, parts, rows, 1, D]


@dataclass
class GraphSet:
    """Static buffers and the captured trajectories of one (transformer, shape)."""

    transformer: torch.nn.Module  # held so that the key's id() cannot be reused while the graphs exist
    latents: torch.Tensor
    guidance: torch.Tensor  # 0-dim: the guidance scale, a graph input rather than a constant in its kernels
    context: dict[str, torch.Tensor | None]
    branches: list[torch.Tensor]
    pool: Any  # one memory pool for every trajectory's graphs
    modulations: dict[int, Modulations] = field(default_factory=dict)  # by number of steps
    trajectories: dict[tuple, Trajectory] = field(default_factory=dict)
    bytes: int = 0


class GraphCache:
    """The process's graph sets by key, least recently used first, within a memory limit."""

    def __init__(self, limit_bytes: int = DEFAULT_GRAPH_MEMORY_MB * 2**20) -> None:
        self.limit_bytes = limit_bytes
        self.sets: OrderedDict[tuple, GraphSet] = OrderedDict()

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.sets.values())

    def get(self, key: tuple, make: Callable[[], GraphSet]) -> GraphSet:
        if key not in self.sets:
            self.sets[key] = make()
        self.sets.move_to_end(key)
        return self.sets[key]

    def grew(self, key: tuple, added: int) -> None:
        """Count `added` bytes to the set at `key`, then evict others, oldest first, while over the limit."""
        self.sets[key].bytes += added
        evicted = 0
        for old in [k for k in self.sets if k != key]:
            if self.bytes <= self.limit_bytes:
                break
            dropped = self.sets.pop(old)
            evicted += 1
            megabytes = dropped.bytes / 2**20
            log.info("evicted the CUDA graphs of %d trajectories (%.0f MiB)", len(dropped.trajectories), megabytes)
        if evicted and torch.cuda.is_available():  # the dropped pools back to the device; else keep the cache warm
            torch.cuda.empty_cache()


GRAPHS = GraphCache()


def capturable(model: Model) -> bool:
    """Whether the `graphs` mode can capture on this model's device."""
    return model.device.type == "cuda" and torch.cuda.is_available()


def capture(step: Callable[[], None], pool: Any, warm: Callable[[], None]) -> Replayable:
    """`step` as a CUDA graph allocating from `pool`, captured after running `warm` (the same step on copies of
    its state) on a side stream, so that lazy initialisation stays out of the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


class GraphedForward:
    """The planned forward whose generations replay one captured CUDA graph per step (`capture_steps`).

    Wraps a `PlannedForward` (precomputed modulations, compiled blocks) and uses its blocks, plan and counts; the
    reuse is copy reuse (the cached output as is), that of every plan method. Called as a forward, it is the
    planned forward itself: what a generation runs where capturing failed.
    """

    def __init__(self, planned: Any) -> None:
        self.planned, self.cache = planned, GRAPHS

    @property
    def computed(self) -> int:
        return self.planned.computed

    @property
    def reused(self) -> int:
        return self.planned.reused

    def __call__(self, batch: torch.Tensor, k: int) -> torch.Tensor:
        return self.planned(batch, k)

    def capture_steps(
        self, denoise: DenoiseStep, scheduler: Any, latents: torch.Tensor, guidance: float
    ) -> Callable[[int], torch.Tensor] | None:
        """This generation's steps as replays: step k replays the graph of `denoise` at step k and returns the
        latents buffer. The trajectory of (plan, scheduler) on this shape is captured at its first use; the
        generation's latents, context and guidance are copied into the shape's buffers. None, saying why, where
        a capture fails: the generation then runs the planned forward."""
        planned = self.planned
        context = planned.pre.context
        shapes = tuple(sorted((name, None if v is None else (tuple(v.shape), v.dtype)) for name, v in context.items()))
        key = (id(planned.transformer), tuple(latents.shape), latents.dtype, planned.cond.cfg, shapes)
        schedule = (type(scheduler).__name__, json.dumps(dict(scheduler.config), sort_keys=True, default=str))
        name = (planned.plan.compute, *schedule, tuple(scheduler.timesteps.tolist()))
        before = torch.cuda.memory_reserved()
        graphs = self.cache.get(key, lambda: self._buffers(latents))
        pre, mods = planned.pre, graphs.modulations.get(planned.plan.steps)
        if mods is None:
            mods = graphs.modulations[planned.plan.steps] = Modulations(torch.stack(pre.blocks, 1), pre.head.clone())
        else:
            torch.stack(pre.blocks, dim=1, out=mods.blocks)
            mods.head.copy_(pre.head)
        try:
            if name not in graphs.trajectories:
                graphs.trajectories[name] = self._capture(graphs, mods, denoise, scheduler)
        except RuntimeError as error:
            log.warning("CUDA graph capture failed, so this generation runs compiled: %s", error)
            return None
        finally:
            self.cache.grew(key, torch.cuda.memory_reserved() - before)
        trajectory = graphs.trajectories[name]
        for name_, value in context.items():
            if value is not None:
                graphs.context[name_].copy_(value)
        graphs.guidance.fill_(guidance)
        graphs.latents.copy_(latents)

        def step(k: int) -> torch.Tensor:
            trajectory.steps[k].replay()
            computes = sum(planned.plan.compute[k])
            planned.computed += computes
            planned.reused += planned.plan.branches - computes
            return graphs.latents  # the next replay updates it in place: callers copy what they keep

        return step

    def _buffers(self, latents: torch.Tensor) -> GraphSet:
        planned, pre = self.planned, self.planned.pre
        batch = latents.new_zeros((planned.cond.rows, *latents.shape[1:]))
        tokens = planned.transformer.pos_embed(batch)
        return GraphSet(
            transformer=planned.transformer,
            latents=torch.empty_like(latents),
            guidance=torch.zeros((), device=latents.device),
            context={name: None if v is None else torch.empty_like(v) for name, v in pre.context.items()},
            branches=[torch.zeros_like(tokens) for _ in range(sum(map(len, planned.indices)))],
            pool=torch.cuda.graph_pool_handle(),
        )

    def _capture(self, graphs: GraphSet, mods: Modulations, denoise: DenoiseStep, scheduler: Any) -> Trajectory:
        """Every step of the plan captured in order with a copy of `scheduler`, each after a warm run on a copy of
        that copy (so the captured one is stepped exactly once per step, as in a generation)."""
        trajectory = Trajectory([], copy.deepcopy(scheduler))
        for k in range(self.planned.plan.steps):
            warm = copy.deepcopy(trajectory.scheduler)
            trajectory.steps.append(
                capture(
                    lambda k=k: self._step(graphs, mods, denoise, trajectory.scheduler, k),
                    graphs.pool,
                    warm=lambda k=k, warm=warm: self._step(graphs, mods, denoise, warm, k),
                )
            )
        return trajectory

    def _step(self, graphs: GraphSet, mods: Modulations, denoise: DenoiseStep, scheduler: Any, k: int) -> None:
        """Step k from and into the static buffers: what a graph captures."""
        run = lambda batch, k: self._blocks(graphs, mods, batch, k)  # noqa: E731
        graphs.latents.copy_(denoise(scheduler, graphs.latents, k, run, graphs.guidance))

    def _blocks(self, graphs: GraphSet, mods: Modulations, batch: torch.Tensor, k: int) -> torch.Tensor:
        """The transformer at step k on `batch`, with its pattern's cached branches in the set's buffers."""
        recall, store = graphs.branches.__getitem__, lambda j, out: graphs.branches[j].copy_(out)
        return self.planned.run_blocks(batch, k, mods.blocks[k], mods.head[k], graphs.context, recall, store)
