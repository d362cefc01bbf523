"""Branch cache on diffusers DiT/PixArt transformers, built from diffusers `ModelHook`s (ALGORITHM.md §1).

One `BranchHook` wraps each branch module (attn1/attn2/ff) and one `StepHook` on the transformer counts
the denoising steps. The compute-or-reuse decision is a Python lookup into the plan row of the current
step, so a reused branch never runs its module and the hot path has no tensor comparison or device sync.
What a reused branch returns is the config's `ReuseStrategy`: its last computed output, or an extrapolation.

Example:
    >>> with branch_cache(pipe_transformer, CacheConfig(plan=fora_plan(20, n_branches, 3))) as state:
    ...     ...  # run the denoising loop; state.computed / state.reused count branch evaluations
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..branches import Branch, find_branches
from .methods import DEFAULT_THRESHOLD
from .plan import CachePlan, ForecastWeights

BRANCH_HOOK = "harmonica_branch_cache"
STEP_HOOK = "harmonica_step_counter"


class CacheError(ValueError):
    """The model cannot be cached as asked (chunked feed-forward, a plan of the wrong shape, ...)."""


class ReuseStrategy(Protocol):
    """What a reused branch returns, from what its computed evaluations left: `store` is called with every
    computed (or, in training, mixed) output, `recall` for every reused one; `reset` starts a generation;
    `detach` cuts what is stored from the autograd graph (training: after each router update)."""

    def reset(self, branches: int) -> None: ...

    def store(self, index: int, step: int, out: torch.Tensor) -> None: ...

    def recall(self, index: int, step: int) -> torch.Tensor | None: ...

    def detach(self) -> None: ...


class CopyReuse:
    """The branch's last stored output, as is (FORA, L2C and HarmoniCa reuse this way)."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor | None] = []

    def reset(self, branches: int) -> None:
        self.values = [None] * branches

    def store(self, index: int, step: int, out: torch.Tensor) -> None:
        self.values[index] = out

    def recall(self, index: int, step: int) -> torch.Tensor | None:
        return self.values[index]

    def detach(self) -> None:
        self.values = [None if value is None else value.detach() for value in self.values]


class ForecastReuse:
    """A reused branch's output extrapolated from its last `order + 1` computed outputs, as a polynomial in the
    step index through them (Newton's divided differences): order 1 continues the last change linearly, order 2
    its curvature too (TaylorSeer, arXiv 2503.06923, with step-index differences). Until a branch has that many
    computed outputs it uses the lower orders it has. Memory: `order` more tensors per branch than copy reuse.

    `weights[step][branch][level - 1]` scales the Newton term of that level where given (learned by the image
    objective; a tensor in training, so the error reaches them): 1 everywhere is the plain forecast, 0 is copy."""

    def __init__(self, order: int = 1, weights: ForecastWeights | torch.Tensor | None = None) -> None:
        if order < 1:
            raise ValueError(f"a forecast has order 1 or more, got {order} (order 0 is CopyReuse)")
        self.order, self.weights = order, weights
        self.history: list[list[tuple[int, torch.Tensor]]] = []

    def reset(self, branches: int) -> None:
        self.history = [[] for _ in range(branches)]

    def store(self, index: int, step: int, out: torch.Tensor) -> None:
        points = self.history[index]
        if points and points[-1][0] == step:  # stored again within a step (training's mixed output): replace
            points.pop()
        points.append((step, out))
        del points[: -(self.order + 1)]

    def recall(self, index: int, step: int) -> torch.Tensor | None:
        points = self.history[index]
        if not points:
            return None
        steps = [k for k, _ in points]
        table = [value for _, value in points]  # divided differences, built in place
        forecast, basis = table[-1], 1.0
        for level in range(1, len(points)):
            table = [(b - a) / (steps[i + level] - steps[i]) for i, (a, b) in enumerate(itertools.pairwise(table))]
            basis *= step - steps[-level]
            weight = 1.0 if self.weights is None else self.weights[step][index][level - 1]
            forecast = forecast + weight * basis * table[-1]
        return forecast

    def detach(self) -> None:
        self.history = [[(k, value.detach()) for k, value in points] for points in self.history]


def reuse_strategy(forecast: int, weights: ForecastWeights | torch.Tensor | None = None) -> ReuseStrategy:
    """The reuse a plan asks for: copy (0), or a forecast of that order (with learned `weights` where given)."""
    return ForecastReuse(forecast, weights) if forecast else CopyReuse()


@dataclass
class CacheConfig:
    """How the cache behaves.

    Attributes:
        plan (`CachePlan`): inference mode; True computes, False reuses the cached output.
        soft_weights (`Tensor`, [T, N]): training mode instead of `plan`: each branch returns
            `r * fresh + (1 - r) * cached` with r = soft_weights[step, branch] (SDT, ALGORITHM.md §3).
        update_threshold (`float`, defaults to `DEFAULT_THRESHOLD`, 0.1): in training mode, the cache entry
            is overwritten only where r > threshold (tau_train).
        reuse (`ReuseStrategy`, defaults to `CopyReuse()`): what a reused branch returns.
    """

    plan: CachePlan | None = None
    soft_weights: torch.Tensor | None = None
    update_threshold: float = DEFAULT_THRESHOLD
    reuse: ReuseStrategy = field(default_factory=CopyReuse)


@dataclass
class CacheState:
    """Everything that changes during a generation, shared by the hooks of one transformer."""

    config: CacheConfig
    branches: list[Branch]
    step: int = -1
    computed: int = 0
    reused: int = 0
    bypass: bool = False  # teacher passes: run everything, touch nothing
    row: tuple[bool, ...] = ()
    batch_shape: tuple[int, ...] | None = None

    def reset(self) -> None:
        """Start a new generation: empty cache, step counter and counts back to zero."""
        self.restart(0)

    def restart(self, at_step: int) -> None:
        """An empty cache whose next transformer call is step `at_step` (training starts mid-trajectory)."""
        self.step, self.computed, self.reused, self.batch_shape = at_step - 1, 0, 0, None
        self.config.reuse.reset(len(self.branches))

    def use_weights(self, weights: torch.Tensor) -> None:
        """Training: the soft router values [T, N] the next steps mix with."""
        self.config.soft_weights = weights

    def detach(self) -> None:
        """Training: cut the cache from the graph of the router values that mixed it (after an update)."""
        self.config.reuse.detach()

    @contextmanager
    def teacher(self) -> Iterator[None]:
        """Calls inside run every branch and leave the cache and the step count untouched."""
        self.bypass = True
        try:
            yield
        finally:
            self.bypass = False

    def begin_step(self, batch_shape: tuple[int, ...]) -> None:
        if batch_shape != self.batch_shape:  # cached tensors would not broadcast: start over
            self.config.reuse.reset(len(self.branches))
            self.batch_shape = batch_shape
        self.step += 1
        plan = self.config.plan
        if plan is not None:
            if self.step >= plan.steps:
                raise CacheError(
                    f"the cache plan covers {plan.steps} steps but the transformer ran a step {self.step + 1}; "
                    "reset the cache per generation and use a plan for the scheduler's step count"
                )
            self.row = plan.compute[self.step]
        else:
            weights = self.config.soft_weights
            # one sync per step (training only): which entries to overwrite
            self.row = tuple((weights[self.step] > self.config.update_threshold).tolist())


class StepHook(ModelHook):
    """On the transformer: one forward call = one denoising step."""

    _is_stateful = True

    def __init__(self, state: CacheState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        if not self.state.bypass:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.state.begin_step(tuple(hidden.shape))
        return args, kwargs

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.reset()
        return module


class BranchHook(ModelHook):
    """On one attn1/attn2/ff module: compute, reuse, or (training) softly mix with the cached output."""

    def __init__(self, state: CacheState, index: int) -> None:
        super().__init__()
        self.state = state
        self.index = index

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        state, i, reuse = self.state, self.index, self.state.config.reuse
        if state.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        cached = reuse.recall(i, state.step)
        if state.config.soft_weights is not None:
            fresh = self.fn_ref.original_forward(*args, **kwargs)
            state.computed += 1
            if cached is None:
                out = fresh
            else:
                r = state.config.soft_weights[state.step, i]
                out = r * fresh + (1 - r) * cached
            if cached is None or state.row[i]:  # kept in the graph: later steps credit this refresh until `detach`
                reuse.store(i, state.step, out)
            return out
        if state.row[i] or cached is None:
            out = self.fn_ref.original_forward(*args, **kwargs)
            reuse.store(i, state.step, out)
            state.computed += 1
            return out
        state.reused += 1
        return cached


def apply_branch_cache(transformer: nn.Module, config: CacheConfig) -> CacheState:
    """Attach the cache to a DiT/PixArt transformer; `remove_branch_cache` restores it exactly."""
    if getattr(transformer, "_harmonica_cache", None) is not None:
        raise CacheError("a branch cache is already attached; call remove_branch_cache first")
    if (config.plan is None) == (config.soft_weights is None):
        raise CacheError("give exactly one of CacheConfig.plan (inference) or CacheConfig.soft_weights (training)")
    branches = find_branches(transformer)
    size = config.plan.branches if config.plan is not None else config.soft_weights.shape[1]
    if size != len(branches):
        raise CacheError(f"the plan has {size} branches but this transformer has {len(branches)}")
    for index, block in enumerate(transformer.transformer_blocks):
        if getattr(block, "_chunk_size", None) is not None:
            raise CacheError(
                f"block {index} uses chunked feed-forward (set_chunk_feed_forward), which calls `ff` per chunk; "
                "turn it off with block.set_chunk_feed_forward(None) before caching"
            )
    state = CacheState(config, branches)
    state.reset()
    for index, branch in enumerate(branches):
        module = transformer.get_submodule(branch.module_path)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(BranchHook(state, index), BRANCH_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(StepHook(state), STEP_HOOK)
    transformer._harmonica_cache = state
    return state


@contextmanager
def branch_cache(transformer: nn.Module, config: CacheConfig) -> Iterator[CacheState]:
    """The cache attached for the block's duration: generation (a plan) or training (soft weights)."""
    state = apply_branch_cache(transformer, config)
    try:
        yield state
    finally:
        remove_branch_cache(transformer)


def remove_branch_cache(transformer: nn.Module) -> None:
    """Detach every hook this module added and drop what the registry left behind on the modules."""
    state: CacheState | None = getattr(transformer, "_harmonica_cache", None)
    if state is None:
        return
    targets = [transformer] + [transformer.get_submodule(b.module_path) for b in state.branches]
    for module, name in zip(targets, [STEP_HOOK] + [BRANCH_HOOK] * len(state.branches), strict=True):
        registry: HookRegistry = module._diffusers_hook
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:  # nobody else hooks this module: leave it as we found it
            del module._diffusers_hook
            module.__dict__.pop("forward", None)
    del transformer._harmonica_cache
