"""The cache hooks on dummy modules, in the manner of diffusers' tests/hooks/test_hooks.py: which branch
runs, what a reused one returns, soft (training) mode, the teacher bypass, removal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from harmonica_core.cache.hooks import (
    CacheConfig,
    CacheError,
    CopyReuse,
    ForecastReuse,
    ReuseStrategy,
    apply_branch_cache,
    branch_cache,
)
from harmonica_core.cache.methods import fora_plan
from harmonica_core.families import FAMILIES, Family


class Counting(nn.Module):
    """A branch that adds its call count, so every output says which call made it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.calls


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1, self.ff = Counting(), Counting()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn1(x) + self.ff(x)


class DummyTransformer(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class DummyFamily(Family):
    """Only what the cache reads: the transformer class and its branch modules."""

    name = "dummy"
    pipelines: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    transformers = ("DummyTransformer",)
    branch_modules: ClassVar[Mapping[str, str]] = {"attn": "attn1", "mlp": "ff"}
    class_conditional = True
    size_multiple = None

    def conditioning(self, model, request):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    meta_conditions = training_conditions = evaluation_conditions = conditioning


@pytest.fixture
def transformer(monkeypatch) -> DummyTransformer:
    monkeypatch.setitem(FAMILIES, "dummy", DummyFamily())
    return DummyTransformer()


def calls(transformer: DummyTransformer) -> list[int]:
    return [branch.calls for block in transformer.transformer_blocks for branch in (block.attn1, block.ff)]


def test_a_reused_branch_never_runs_and_returns_its_last_output(transformer):
    x = torch.zeros(1, 2)
    with branch_cache(transformer, CacheConfig(plan=fora_plan(4, 4, interval=2))) as state:
        outputs = [transformer(x) for _ in range(4)]
    assert calls(transformer) == [2, 2, 2, 2]  # steps 0 and 2 compute, 1 and 3 reuse
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[2], outputs[3])
    assert not torch.equal(outputs[0], outputs[2])
    assert (state.computed, state.reused) == (8, 8)


def test_removal_restores_the_modules_exactly_and_a_second_cache_is_refused(transformer):
    forwards = {name: module.forward for name, module in transformer.named_modules()}
    with (
        branch_cache(transformer, CacheConfig(plan=fora_plan(2, 4))),
        pytest.raises(CacheError, match="already attached"),
    ):
        apply_branch_cache(transformer, CacheConfig(plan=fora_plan(2, 4)))
    for name, module in transformer.named_modules():
        assert not hasattr(module, "_diffusers_hook") and module.forward == forwards[name]
    assert not hasattr(transformer, "_harmonica_cache")
    with pytest.raises(CacheError, match="has 4"):
        apply_branch_cache(transformer, CacheConfig(plan=fora_plan(2, 3)))


def test_soft_mode_mixes_fresh_and_cached_and_the_teacher_touches_nothing(transformer):
    x = torch.zeros(1, 2)
    weights = torch.tensor([[1.0] * 4, [0.25] * 4])
    with branch_cache(transformer, CacheConfig(soft_weights=weights, update_threshold=0.5)) as state:
        transformer(x)  # step 0 fills the cache: attn1 of block 0 returned 0 + 1
        with state.teacher():
            transformer(x)  # not a step: the cache and the step count stay as they were
        assert state.step == 0 and state.config.reuse.recall(0, 0).tolist() == [[1.0, 1.0]]
        transformer(x)  # step 1: 0.25 * fresh (call 3: 0 + 3) + 0.75 * cached (1)
        assert state.config.reuse.recall(0, 1).tolist() == [[1.0, 1.0]]  # r <= 0.5: the entry is kept
        state.restart(at_step=1)
        assert state.step == 0 and state.config.reuse.recall(0, 1) is None
    assert calls(transformer) == [3, 3, 3, 3]


@pytest.mark.parametrize(("reuse", "value", "slope"), [(CopyReuse(), 1.75, 1.0), (ForecastReuse(1), 2.5, 2.0)])
def test_a_soft_cache_entry_credits_the_router_value_that_refreshed_it_until_detached(
    transformer, reuse: ReuseStrategy, value: float, slope: float
):
    x = torch.zeros(1, 2)
    weights = torch.tensor([[1.0] * 4, [0.75] * 4], requires_grad=True)
    with branch_cache(transformer, CacheConfig(soft_weights=weights, update_threshold=0.5, reuse=reuse)) as state:
        transformer(x)  # step 0: attn1 of block 0 stores 0 + 1
        transformer(x)  # step 1: it stores r * 2 + (1 - r) * 1 with r = weights[1, 0] = 0.75
        cached = state.config.reuse.recall(0, 2)  # copy: 1.75; forecast: 1.75 + (1.75 - 1) = 2.5
        (grad,) = torch.autograd.grad(cached.sum(), weights)
        assert cached.tolist() == [[value, value]]
        expected = torch.zeros(2, 4)
        expected[1, 0] = 2 * slope  # two elements, each d(entry)/dr = slope * (2 - 1)
        assert torch.equal(grad, expected)
        state.detach()
        assert state.config.reuse.recall(0, 2).grad_fn is None


def test_the_reuse_strategy_decides_what_a_reused_branch_returns(transformer):
    class Doubled(CopyReuse):
        def recall(self, index: int, step: int) -> torch.Tensor | None:
            value = super().recall(index, step)
            return None if value is None else 2 * value

    x = torch.zeros(1, 2)
    plan = fora_plan(2, 4, interval=2)
    with branch_cache(transformer, CacheConfig(plan=plan)):
        copied = [transformer(x) for _ in range(2)]
    with branch_cache(transformer, CacheConfig(plan=plan, reuse=Doubled())):
        doubled = [transformer(x) for _ in range(2)]
    assert torch.equal(copied[0], copied[1]) and not torch.equal(doubled[0], doubled[1])
