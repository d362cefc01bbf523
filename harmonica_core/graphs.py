"""CUDA graphs per plan step (the `graphs` execution mode).

On a GPU the uncached DiT step is bound by the host launching small kernels, and a reused branch removes
arithmetic but few launches. A plan is static, so every step's work is known before it runs: the compiled
blocks of one step pattern (which branches compute) are captured once per shape into a CUDA graph and
replayed, so a step is four launches whatever it computes.

A graph reads and writes fixed addresses, so each shape (rows, latent size, text length, dtype) gets one
`GraphSet` of static buffers: the step's input batch and modulations (copied in before each replay), the
generation's text context (copied in once), one buffer per branch holding its cached output (written where
the pattern computes the branch, read where it reuses it), and the output. Nothing a replay leaves behind
lives in the graphs' memory pool: one pool is shared by every pattern of a shape. Sets are evicted least
recently used when their memory passes `GraphCache.limit_bytes`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .models import Model

log = logging.getLogger("harmonica.graphs")

DEFAULT_GRAPH_MEMORY_MB = 4096


class Replayable(Protocol):
    def replay(self) -> None: ...


@dataclass
class GraphSet:
    """Static buffers and the captured step patterns of one (transformer, shape)."""

    transformer: torch.nn.Module  # held so that the key's id() cannot be reused while the graphs exist
    batch: torch.Tensor
    mods: torch.Tensor  # [blocks, parts, rows, 1, D]: every block's modulation for the step being replayed
    head: torch.Tensor
    context: dict[str, torch.Tensor | None]
    branches: list[torch.Tensor]
    out: torch.Tensor
    pool: Any  # one memory pool for every pattern's graph
    graphs: dict[tuple[bool, ...], Replayable] = field(default_factory=dict)
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
            log.info("evicted CUDA graphs of %d step patterns (%.0f MiB)", len(dropped.graphs), dropped.bytes / 2**20)
        if evicted and torch.cuda.is_available():  # the dropped pools back to the device; else keep the cache warm
            torch.cuda.empty_cache()


GRAPHS = GraphCache()


def capturable(model: Model) -> bool:
    """Whether the `graphs` mode can capture on this model's device."""
    return model.device.type == "cuda" and torch.cuda.is_available()


def capture(step: Callable[[], None], pool: Any) -> Replayable:
    """`step` as a CUDA graph allocating from `pool`, captured after one run on a side stream (lazy
    initialisation stays out of the graph). A step writes only what its replay will write from the same
    inputs, so the extra run leaves the generation's state as it was."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


class GraphedForward:
    """The planned forward, each distinct step pattern replayed from a CUDA graph captured at its first use.

    Wraps a `PlannedForward` (precomputed modulations, compiled blocks) and runs its blocks, plan and counts;
    the reuse is copy reuse (the cached output as is), that of every plan method. Where a capture fails, the
    rest of the generation runs the planned forward from the cache the graphs left.
    """

    def __init__(self, planned: Any) -> None:
        self.planned, self.cache = planned, GRAPHS
        pre = planned.pre
        self.mods = torch.stack(pre.blocks, dim=1)  # [T, blocks, parts, rows, 1, D]: one copy per step
        pre.blocks = list(self.mods.unbind(1))  # views, for the fallback
        self.graphs: GraphSet | None = None
        self.key: tuple = ()
        self.fallback = False

    @property
    def computed(self) -> int:
        return self.planned.computed

    @property
    def reused(self) -> int:
        return self.planned.reused

    def _graph_set(self, batch: torch.Tensor) -> GraphSet:
        """The graph set of this batch's shape, its context buffers holding this generation's context."""
        context = self.planned.pre.context
        shapes = tuple(sorted((name, None if v is None else (tuple(v.shape), v.dtype)) for name, v in context.items()))
        key = self.key = (id(self.planned.transformer), tuple(batch.shape), batch.dtype, shapes)
        before = torch.cuda.memory_reserved()
        graphs = self.cache.get(key, lambda: self._buffers(batch))
        for name, value in context.items():
            if value is not None:
                graphs.context[name].copy_(value)
        self.cache.grew(key, torch.cuda.memory_reserved() - before)
        return graphs

    def _buffers(self, batch: torch.Tensor) -> GraphSet:
        planned, pre = self.planned, self.planned.pre
        tokens = planned.transformer.pos_embed(batch)
        out_shape = (batch.shape[0], planned.transformer.out_channels, *batch.shape[-2:])
        return GraphSet(
            transformer=planned.transformer,
            batch=torch.empty_like(batch),
            mods=torch.empty_like(self.mods[0]),
            head=torch.empty_like(pre.head[0]),
            context={name: None if v is None else torch.empty_like(v) for name, v in pre.context.items()},
            branches=[torch.empty_like(tokens) for _ in range(sum(map(len, planned.indices)))],
            out=torch.empty(out_shape, dtype=batch.dtype, device=batch.device),
            pool=torch.cuda.graph_pool_handle(),
        )

    def _step(self, graphs: GraphSet, pattern: tuple[bool, ...]) -> None:
        """One step of `pattern` from and into the static buffers: what a graph captures."""
        planned = self.planned
        x = planned.transformer.pos_embed(graphs.batch)
        blocks = planned.transformer.transformer_blocks
        for n, (block, indices) in enumerate(zip(blocks, planned.indices, strict=True)):
            cached = tuple(None if pattern[j] else graphs.branches[j] for j in indices)
            x, outs = planned.block_forward(block, x, graphs.mods[n], graphs.context, cached)
            for j, was, out in zip(indices, cached, outs, strict=True):
                if was is None:
                    graphs.branches[j].copy_(out)
        out = planned.family.head(planned.transformer, x, graphs.head)
        height, width = graphs.batch.shape[-2:]
        graphs.out.copy_(planned.family.unpatchify(planned.transformer, out, height, width))

    def _capture(self, graphs: GraphSet, pattern: tuple[bool, ...]) -> Replayable:
        before = torch.cuda.memory_reserved()
        graph = graphs.graphs[pattern] = capture(lambda: self._step(graphs, pattern), graphs.pool)
        self.cache.grew(self.key, torch.cuda.memory_reserved() - before)
        return graph

    def __call__(self, batch: torch.Tensor, k: int) -> torch.Tensor:
        planned = self.planned
        if self.fallback:
            return planned(batch, k)
        graphs = self.graphs = self.graphs or self._graph_set(batch)
        pattern = tuple(planned.plan.compute[k])
        graphs.batch.copy_(batch)
        graphs.mods.copy_(self.mods[k])
        graphs.head.copy_(planned.pre.head[k])
        graph = graphs.graphs.get(pattern)
        if graph is None:
            try:
                graph = self._capture(graphs, pattern)
            except RuntimeError as error:
                log.warning("CUDA graph capture failed, so this generation goes on compiled: %s", error)
                self.fallback = True
                for j, value in enumerate(graphs.branches):  # the cache so far, for the planned forward
                    planned.reuse.store(j, k, value.clone())
                return planned(batch, k)
        graph.replay()
        computes = sum(pattern)
        planned.computed += computes
        planned.reused += len(pattern) - computes
        return graphs.out.clone()  # the next replay overwrites the buffer; a multistep solver keeps outputs
