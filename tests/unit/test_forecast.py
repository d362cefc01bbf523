"""Forecast reuse: a reused branch extrapolated from its last computed outputs, selectable for every plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harmonica_core import execution
from harmonica_core.cache.hooks import CopyReuse, ForecastReuse, reuse_strategy
from harmonica_core.cache.methods import make_plan
from harmonica_core.cache.plan import CachePlan
from harmonica_core.router import Router
from harmonica_core.sampling import GenerationRequest, generate


def test_first_order_continues_the_last_change_by_hand():
    reuse = ForecastReuse(order=1)
    reuse.reset(1)
    assert reuse.recall(0, 1) is None  # nothing computed yet
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0])
    reuse.store(0, 0, a)
    torch.testing.assert_close(reuse.recall(0, 1), a)  # one point: a copy
    reuse.store(0, 2, b)  # computed at steps 0 and 2
    torch.testing.assert_close(reuse.recall(0, 3), b + (3 - 2) * (b - a) / (2 - 0))
    torch.testing.assert_close(reuse.recall(0, 5), b + (5 - 2) * (b - a) / (2 - 0))


def test_second_order_is_exact_on_a_quadratic_and_keeps_three_points():
    def f(k: int) -> torch.Tensor:
        return torch.tensor([2.0 * k * k - 3.0 * k + 1.0, 0.5 * k * k])

    reuse = ForecastReuse(order=2)
    reuse.reset(2)
    for k in (0, 1, 3, 4):  # uneven spacing, as a plan computes
        reuse.store(1, k, f(k))
    assert [k for k, _ in reuse.history[1]] == [1, 3, 4]
    for k in (5, 6, 9):
        torch.testing.assert_close(reuse.recall(1, k), f(k))
    reuse.store(1, 4, f(4) + 1)  # stored again at the same step (training's mixed output): replaced
    assert [k for k, _ in reuse.history[1]] == [1, 3, 4]


def test_learned_weights_scale_each_term_of_the_forecast_by_hand():
    a, b, c = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.0]), torch.tensor([3.0, 5.0])
    weights = [[[1.0, 1.0]] for _ in range(6)]
    weights[5] = [[0.5, -2.0]]  # step 5: half the slope, minus twice the curvature term
    reuse = ForecastReuse(order=2, weights=weights)
    reuse.reset(1)
    for step, value in ((0, a), (2, b), (3, c)):
        reuse.store(0, step, value)
    slope, curvature = (c - b) / 1, ((c - b) / 1 - (b - a) / 2) / (3 - 0)
    torch.testing.assert_close(reuse.recall(0, 4), c + 1 * slope + (1 * 2) * curvature)  # weights 1: plain
    torch.testing.assert_close(reuse.recall(0, 5), c + 0.5 * 2 * slope - 2.0 * (2 * 3) * curvature)
    zero = ForecastReuse(order=1, weights=torch.zeros(6, 1, 1))
    zero.reset(1)
    zero.store(0, 0, a), zero.store(0, 2, b)
    torch.testing.assert_close(zero.recall(0, 3), b)  # weight 0: a copy


def test_a_plan_keeps_learned_weights_only_for_their_own_order():
    layout = ["0.attn", "0.mlp"]
    router = Router(4, 2, forecast=1)
    with torch.no_grad():
        router.forecast_weights.fill_(0.25)
    plan = make_plan("harmonica", 4, layout, router, threshold=0.5)
    assert plan.forecast == 1 and plan.forecast_weights == ((((0.25,),) * 2),) * 4
    assert make_plan("harmonica", 4, layout, router, threshold=0.5, forecast=1) == plan
    other = make_plan("harmonica", 4, layout, router, threshold=0.5, forecast=2)
    assert other.forecast == 2 and other.forecast_weights is None  # another order: the plain forecast
    with pytest.raises(ValueError, match="4 x 2 x 1"):
        CachePlan(plan.compute, 1, plan.forecast_weights[:3])


def test_every_method_takes_a_forecast_order_and_copy_is_order_zero():
    layout = ["0.attn", "0.mlp"]
    assert make_plan("fora", 6, layout, interval=3).forecast == 0
    plan = make_plan("fora", 6, layout, interval=3, forecast=2)
    assert plan.forecast == 2 and plan.compute == make_plan("fora", 6, layout, interval=3).compute
    assert isinstance(reuse_strategy(0), CopyReuse) and reuse_strategy(2).order == 2
    with pytest.raises(ValueError, match="order 1 or more"):
        ForecastReuse(0)


def test_a_forecasting_generation_agrees_across_modes_and_differs_from_copy(digits, monkeypatch):
    n, request = len(digits.branch_layout), GenerationRequest(class_labels=[3, 8], steps=10, guidance=1.5, seed=2)
    copy = make_plan("fora", 10, digits.branch_layout, interval=3)
    forecast = make_plan("fora", 10, digits.branch_layout, interval=3, forecast=1)
    eager = generate(digits, request, forecast, mode="eager")
    planned = generate(digits, request, forecast, mode="precomputed")
    torch.testing.assert_close(planned.images, eager.images, atol=2e-5, rtol=1e-5)
    assert (planned.stats.computed, planned.stats.reused) == (4 * n, 6 * n)
    assert (planned.images - generate(digits, request, copy).images).abs().max() > 1e-3
    monkeypatch.setattr(execution, "capturable", lambda model: True)
    assert execution.resolve_mode(digits, "graphs", forecast) == "compiled"  # graphs replay copy reuse only
    assert execution.resolve_mode(digits, "graphs", copy) == "graphs"


def test_learned_forecast_weights_act_alike_in_every_mode(digits):
    request = GenerationRequest(class_labels=[3, 8], steps=10, guidance=1.5, seed=2)
    plain = make_plan("fora", 10, digits.branch_layout, interval=3, forecast=1)
    damped = dataclasses.replace(plain, forecast_weights=(((0.5,),) * plain.branches,) * 10)
    eager = generate(digits, request, damped, mode="eager")
    torch.testing.assert_close(generate(digits, request, damped, mode="precomputed").images, eager.images)
    assert (eager.images - generate(digits, request, plain, mode="eager").images).abs().max() > 1e-3
