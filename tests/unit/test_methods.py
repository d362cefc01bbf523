"""The cache-method registry and the schedules added through it, Delta-DiT-style and spread (no torch needed)."""

from __future__ import annotations

import pytest

from harmonica_core.cache.delta import delta_plan
from harmonica_core.cache.methods import METHODS, NEEDS_ROUTER, make_plan, methods_using, parameters, spread_plan

# 4 blocks with attention and MLP branches, as `branch_layout` names them.
LAYOUT = [f"{block}.{kind}" for block in range(4) for kind in ("attn", "mlp")]


def reused_blocks(row: tuple[bool, ...]) -> set[int]:
    return {int(name.split(".")[0]) for name, compute in zip(LAYOUT, row, strict=True) if not compute}


def test_delta_reuses_rear_blocks_early_and_front_blocks_late_between_full_steps():
    plan = delta_plan(10, LAYOUT, usage=0.2, interval=2)
    assert all(all(plan.compute[k]) for k in range(0, 10, 2))  # step 0 and every 2nd step refresh the cache
    early, late = [reused_blocks(plan.compute[k]) for k in (1, 7)]
    assert early == {3, 2} and late == {0, 1}  # m = 2 of 4 blocks: rear early, front late
    assert plan.cache_usage_rate == pytest.approx(0.25)  # the closest to 0.2 that whole blocks allow


def test_delta_lands_near_the_target_usage_and_says_what_it_can_reach():
    for usage in (0.3, 0.45, 0.6):
        assert abs(delta_plan(20, LAYOUT, usage, interval=4).cache_usage_rate - usage) <= 0.1
    with pytest.raises(ValueError, match="at most 50% cache usage at interval 2"):
        delta_plan(20, LAYOUT, usage=0.7, interval=2)
    with pytest.raises(ValueError, match="interval >= 2"):
        delta_plan(20, LAYOUT, usage=0.3, interval=1)


def test_a_spread_plan_is_fora_at_a_fractional_interval():
    plan = make_plan("spread", 20, LAYOUT, usage=0.4, forecast=1)
    full = [k for k, row in enumerate(plan.compute) if all(row)]
    assert full == [0, 1, 3, 5, 6, 8, 10, 11, 13, 15, 16, 18] and plan.cache_usage_rate == pytest.approx(0.4)
    assert not any(any(row) for k, row in enumerate(plan.compute) if k not in full) and plan.forecast == 1
    assert make_plan("spread", 20, LAYOUT, usage=0.5).compute == make_plan("fora", 20, LAYOUT, interval=2).compute
    assert make_plan("spread", 20, LAYOUT, usage=0.99).cache_usage_rate == pytest.approx(0.95)  # step 0 computes
    with pytest.raises(ValueError, match="computes 1 to 20 steps, got 0"):
        spread_plan(20, len(LAYOUT), 0)


def test_every_method_states_its_parameters_and_fills_their_defaults():
    params = parameters()
    assert set(params) == {"threshold", "interval", "usage", "forecast"}
    assert methods_using(params["interval"]) == "fora, delta" and methods_using(params["forecast"]) == "every method"
    assert {"l2c", "harmonica"} == NEEDS_ROUTER
    for spec in METHODS.values():
        assert spec.description and all(p.help and p.bounds for p in spec.params)
    assert make_plan("delta", 20, LAYOUT) == delta_plan(20, LAYOUT, params["usage"].default, params["interval"].default)
    assert make_plan("fora", 3, LAYOUT, interval=None) == make_plan("fora", 3, LAYOUT, interval=2)
    with pytest.raises(ValueError, match="needs a router"):
        make_plan("harmonica", 10, LAYOUT)


def test_the_cli_the_http_schema_and_the_metrics_read_the_same_registry():
    from app.api.routes.generate import Acceleration
    from harmonica_core.cli import build_parser

    schema = Acceleration.model_json_schema()["properties"]
    assert schema["method"]["enum"] == list(METHODS)
    assert set(params := parameters()) <= set(schema)
    assert schema["usage"]["default"] == params["usage"].default
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {action.dest: action for action in generate._actions}
    assert list(flags["method"].choices) == list(METHODS) and set(params) <= set(flags)


def test_an_unreachable_delta_usage_is_refused_before_any_model_loads(capsys):
    from harmonica_core.cli import main
    from harmonica_core.errors import InvalidRequest
    from harmonica_core.validation import Limits, validate_generation

    request = {"model": "digits", "steps": 20, "num_images": 1, "scheduler": "ddim", "guidance": 1.5}
    accel = {"method": "delta", "router_id": None, "usage": 0.9, "interval": 2}
    with pytest.raises(InvalidRequest, match="at most 50%") as refused:
        validate_generation({**request, "acceleration": accel}, Limits())
    assert refused.value.field == "acceleration.usage"
    with pytest.raises(InvalidRequest) as refused:
        validate_generation({**request, "acceleration": {**accel, "usage": 0.3, "interval": 1}}, Limits())
    assert refused.value.field == "acceleration.interval"
    assert main(["generate", "--method", "delta", "--usage", "0.9", "--out", "unused"]) == 2
    assert "raise the interval" in capsys.readouterr().err
