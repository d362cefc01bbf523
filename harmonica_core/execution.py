"""How a generation runs the transformer: the execution modes (`MODES`) and the forward each one uses.

- `eager`: diffusers' own forward with the cache's hooks (`cache.hooks`); the reference, and what router
  training uses (its soft mixing needs the hooks).
- `precomputed`: every block's modulation for all steps is computed before the loop (`Family.precompute`),
  and each block runs the family's `block_forward`, which skips a reused branch's norm and modulation too.
- `compiled`: `precomputed` with `block_forward` compiled by `torch.compile`: one graph per variant (which
  of a block's branches compute), shared by every block and, with dynamic shapes, every batch size and
  resolution. The compute/reuse choice stays plain Python from the plan, so there is no graph break.
- `graphs` (CUDA): `compiled`, with each distinct step pattern of the plan captured once per shape as a CUDA
  graph and replayed (`graphs.py`); without CUDA it runs `compiled`, saying so once.
- `auto` (the default): the fastest measured on the device (README, "Speed"): `graphs` on CUDA, where the
  step is bound by launching kernels, and `precomputed` on CPU, where compiling pays only at large batches.

A static plan is what makes this possible: nothing in a step depends on a tensor's value.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import torch

from .branches import find_branches
from .cache.hooks import CacheConfig, CacheState, CopyReuse, ReuseStrategy, branch_cache, reuse_strategy
from .cache.plan import CachePlan
from .catalog import DEFAULT_EXECUTION_MODE as DEFAULT_MODE
from .catalog import EXECUTION_MODES as MODES
from .families import Conditioning, Family
from .graphs import GraphedForward, capturable
from .models import Model

if TYPE_CHECKING:
    from .sampling import GenerationRequest

log = logging.getLogger("harmonica.execution")

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "Forward",
    "PlannedForward",
    "resolve_mode",
    "transformer_forward",
    "variant_plan",
    "warm_up",
]


class Forward(Protocol):
    """The transformer's output for the batch at step `k` of a generation, counting the branches it ran."""

    computed: int
    reused: int

    def __call__(self, batch: torch.Tensor, k: int) -> torch.Tensor: ...


class EagerForward:
    """diffusers' forward; the hooks of `branch_cache` follow the plan and count the branches."""

    def __init__(self, model: Model, cond: Conditioning, timesteps: torch.Tensor, state: CacheState) -> None:
        self.transformer, self.kwargs, self.state = model.transformer, cond.kwargs, state
        self.timesteps = timesteps.to(model.device)  # one copy from the host per generation, not one per step

    @property
    def computed(self) -> int:
        return self.state.computed

    @property
    def reused(self) -> int:
        return self.state.reused

    def __call__(self, batch: torch.Tensor, k: int) -> torch.Tensor:
        timestep = self.timesteps[k].expand(batch.shape[0])
        return self.transformer(batch, timestep=timestep, return_dict=False, **self.kwargs)[0]


_compiled: dict[str, Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]] = {}


def compiled_block_forward(family: Family) -> Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """The family's `block_forward` under `torch.compile`, made once per process.

    Dynamic shapes from the first call, so a new batch size or resolution reuses the graphs (sizes 0 and 1
    still specialize: a one-row batch is a variant of its own). Dynamo guards on which cached outputs are
    None, so each variant is one graph, shared by all blocks (their weights are graph inputs).
    """
    if family.name not in _compiled:
        variants = 2 ** len(family.branch_modules)
        # every variant at two specializations (one row, many rows), per dtype; the default limit of 8 is too few
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * variants)
        _compiled[family.name] = torch.compile(family.block_forward, fullgraph=True, dynamic=True)
    return _compiled[family.name]


class PlannedForward:
    """The family's blocks driven by the plan row of each step, with precomputed modulations."""

    def __init__(
        self,
        model: Model,
        plan: CachePlan,
        cond: Conditioning,
        timesteps: torch.Tensor,
        compiled: bool,
        reuse: ReuseStrategy | None = None,
    ) -> None:
        self.transformer, self.family, self.plan, self.cond = model.transformer, model.spec, plan, cond
        self.pre = self.family.precompute(self.transformer, timesteps.to(model.device), cond.kwargs, cond.rows)
        self.block_forward = compiled_block_forward(self.family) if compiled else self.family.block_forward
        branches = find_branches(self.transformer)
        blocks = range(len(self.transformer.transformer_blocks))
        self.indices = [[i for i, branch in enumerate(branches) if branch.block == n] for n in blocks]
        self.reuse = reuse or CopyReuse()
        self.reuse.reset(len(branches))
        self.computed = self.reused = 0

    def __call__(self, batch: torch.Tensor, k: int) -> torch.Tensor:
        reuse, computed = self.reuse, self.computed

        def store(j: int, out: torch.Tensor) -> None:
            reuse.store(j, k, out)
            self.computed += 1

        mods = [block[k] for block in self.pre.blocks]
        out = self.run_blocks(batch, k, mods, self.pre.head[k], self.pre.context, lambda j: reuse.recall(j, k), store)
        self.reused += self.plan.branches - (self.computed - computed)
        return out

    def run_blocks(
        self,
        batch: torch.Tensor,
        k: int,
        mods: Sequence[torch.Tensor],
        head: torch.Tensor,
        context: dict[str, torch.Tensor | None],
        recall: Callable[[int], torch.Tensor | None],
        store: Callable[[int, torch.Tensor], object],
    ) -> torch.Tensor:
        """The transformer at step k: branch j computes where the plan says so or `recall(j)` has nothing, and
        then `store(j, out)` keeps its output; elsewhere the block reuses `recall(j)`. `mods` holds each block's
        modulation at step k; the `graphs` mode calls this with its static buffers."""
        row = self.plan.compute[k]
        x = self.transformer.pos_embed(batch)
        for block, indices, block_mods in zip(self.transformer.transformer_blocks, self.indices, mods, strict=True):
            cached = tuple(None if row[j] else recall(j) for j in indices)
            x, outs = self.block_forward(block, x, block_mods, context, cached)
            for j, was, out in zip(indices, cached, outs, strict=True):
                if was is None:
                    store(j, out)
        out = self.family.head(self.transformer, x, head)
        return self.family.unpatchify(self.transformer, out, batch.shape[-2], batch.shape[-1])


_said_no_graphs: list[torch.device] = []  # the fallback's one log line per process


def resolve_mode(model: Model, mode: str, plan: CachePlan | None = None) -> str:
    """The mode a generation of `model` (with `plan`) runs in when `mode` is asked for: `auto` by device, and the
    nearest that works where the asked one cannot (no planned forward for the family: eager; no CUDA, a
    forecasting plan, whose reuse is not a static buffer, or a plan reusing a branch before computing it, which
    the other modes compute there: compiled for graphs)."""
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "graphs" if capturable(model) else "precomputed"
    if mode != "eager" and not model.spec.runs_blocks:
        log.debug("the %s family has no planned forward: %s runs in eager mode", model.spec.name, model.name)
        return "eager"
    if mode == "graphs" and plan is not None and (plan.forecast or plan.reuses_before_computing):
        return "compiled"
    if mode == "graphs" and not capturable(model):
        if not _said_no_graphs:
            log.warning("CUDA graphs need a CUDA device; %s on %s runs in compiled mode", model.name, model.device)
            _said_no_graphs.append(model.device)
        return "compiled"
    return mode


@contextmanager
def transformer_forward(
    model: Model, plan: CachePlan, cond: Conditioning, timesteps: torch.Tensor, mode: str = DEFAULT_MODE
) -> Iterator[Forward]:
    """The forward of `mode` (resolved: `resolve_mode`) for one generation, with the plan attached for as long
    as the block runs."""
    mode, reuse = resolve_mode(model, mode, plan), reuse_strategy(plan.forecast, plan.forecast_weights)
    if mode != "eager":
        planned = PlannedForward(model, plan, cond, timesteps, compiled=mode != "precomputed", reuse=reuse)
        yield GraphedForward(planned) if mode == "graphs" else planned
        return
    with branch_cache(model.transformer, CacheConfig(plan=plan, reuse=reuse)) as state:
        yield EagerForward(model, cond, timesteps, state)


def variant_plan(steps_per_variant: int, layout: list[str]) -> CachePlan:
    """A plan whose steps walk through every variant of every block: all compute, then each compute/reuse
    pattern of a block's branches in turn (applied to all blocks), so one generation compiles them all."""
    kinds = list(dict.fromkeys(name.split(".", 1)[1] for name in layout))
    rows = [[True] * len(layout)]
    for pattern in itertools.product([True, False], repeat=len(kinds)):
        computes = dict(zip(kinds, pattern, strict=True))
        rows += [[computes[name.split(".", 1)[1]] for name in layout]] * steps_per_variant
    return CachePlan.from_rows(rows)


def warm_up(model: Model, mode: str, request: GenerationRequest | None = None) -> float:
    """One small generation per specialization (a one-row and a two-row batch at the model's default size, or
    `request`'s) with a plan through every variant, so that no job pays for compiling or capturing the
    graphs of those shapes; returns the seconds it took."""
    from .sampling import GenerationRequest, generate  # sampling builds on this module

    start = time.perf_counter()
    if resolve_mode(model, mode) in ("compiled", "graphs"):
        plan = variant_plan(1, model.branch_layout)
        if request is None:
            request = GenerationRequest(**model.spec.evaluation_conditions(model, 1, ("a photo of a cat",), None))
        for guidance in (1.0, 4.0):  # without and with classifier-free guidance: one row, two rows
            generate(model, replace(request, steps=plan.steps, guidance=guidance), plan, mode=mode)
    seconds = time.perf_counter() - start
    log.info("warmed up %s for %s mode in %.1f s", model.name, mode, seconds)
    return seconds
