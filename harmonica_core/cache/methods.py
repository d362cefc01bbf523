"""Cache methods: the one registry the CLI, the HTTP schema, request validation, the workers and the
metric labels read (ALGORITHM.md §2, §5).

A method is a `MethodSpec`: its name, what it does, whether it needs a trained router, its parameters
(with defaults and bounds) and the factory that turns them into a `CachePlan` for a model's branch
layout. To add a method, write its factory in a module of this package and add its spec to `METHODS`.
Torch-free: a router is only handed through to the factories that need one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .delta import check_delta, delta_plan
from .plan import CachePlan

if TYPE_CHECKING:
    from ..router import Router

DEFAULT_THRESHOLD = 0.1  # a router's compute/reuse threshold tau, in training and at inference


@dataclass(frozen=True)
class Param:
    """A method parameter as every entry point shows it: the CLI flag `--<name>` and the HTTP field
    `acceleration.<name>`. `default` None means the method fills it in (the router's own threshold)."""

    name: str
    type: type
    default: Any
    bounds: Mapping[str, float]  # pydantic-style constraints: ge, gt, le, lt
    help: str


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    factory: Callable[..., CachePlan]  # (steps, layout, router, **params) -> CachePlan
    params: tuple[Param, ...] = ()
    needs_router: bool = False
    check: Callable[..., None] | None = None  # (steps, **params): refuses what no model could plan, without torch

    def values(self, **params: Any) -> dict[str, Any]:
        """The method's own parameters from `params`, defaults where absent or None."""
        return _values(self.params, params)

    def plan(self, steps: int, layout: Sequence[str], router: Router | None = None, **params: Any) -> CachePlan:
        """The plan for `steps` steps of a model with these branches (names `<block>.<kind>`), with the
        parameters every method takes (`COMMON_PARAMS`)."""
        if self.needs_router and router is None:
            raise ValueError(f"method {self.name!r} needs a router (train one with `harmonica train-router`)")
        plan = self.factory(steps, layout, router, **self.values(**params))
        common = {p.name: params[p.name] for p in COMMON_PARAMS if params.get(p.name) is not None}
        if common.get("forecast", plan.forecast) != plan.forecast:  # a router's weights are for its own order
            common["forecast_weights"] = None
        return replace(plan, **common)  # None keeps the plan's default (copy)


def _values(params: Sequence[Param], given: Mapping[str, Any]) -> dict[str, Any]:
    return {p.name: p.default if given.get(p.name) is None else given[p.name] for p in params}


def none_plan(steps: int, branches: int) -> CachePlan:
    """Compute everything (the reference)."""
    return CachePlan.from_rows([[True] * branches for _ in range(steps)])


def fora_plan(steps: int, branches: int, interval: int = 2) -> CachePlan:
    """FORA: compute all branches every `interval`-th step (0, n, 2n, ...), reuse all in between."""
    if interval < 1:
        raise ValueError(f"the FORA interval must be >= 1, got {interval}")
    return CachePlan.from_rows([[k % interval == 0] * branches for k in range(steps)])


def spread_plan(steps: int, branches: int, computing: int) -> CachePlan:
    """All branches computed at `computing` steps spread evenly (step k * steps // computing), reused in between:
    FORA with a fractional interval (`computing` = steps / n is FORA n), for any usage."""
    if not 1 <= computing <= steps:
        raise ValueError(f"a spread plan computes 1 to {steps} steps, got {computing}")
    full = {k * steps // computing for k in range(computing)}
    return CachePlan.from_rows([[k in full] * branches for k in range(steps)])


def l2c_plan(router: Router, threshold: float = DEFAULT_THRESHOLD) -> CachePlan:
    """Learning-to-Cache: odd steps (1st, 3rd, ...) run in full, the others follow the router."""
    routed = router.plan(threshold).compute
    return CachePlan.from_rows([[True] * len(row) if k % 2 == 0 else row for k, row in enumerate(routed)])


THRESHOLD = Param(
    "threshold",
    float,
    None,
    {"ge": 0, "le": 1},
    "compute a branch where the router value exceeds this (default: the router's training threshold); lower "
    "means more computation and higher quality",
)
INTERVAL = Param("interval", int, 2, {"ge": 1, "le": 1000}, "compute every N-th step in full, reuse in between")
FORECAST = Param(
    "forecast",
    int,
    None,
    {"ge": 0, "le": 2},
    "what a reused branch returns: 0 its last computed output; 1 or 2 an extrapolation of that order from its "
    "last computed outputs (TaylorSeer-style; 1 or 2 more cached tensors per branch). Default: the router's own "
    "(what it was trained with) for a router method, else 0",
)
COMMON_PARAMS = (FORECAST,)  # every method takes these; they set the plan's fields, not its compute table
USAGE = Param("usage", float, 0.4, {"gt": 0, "lt": 1}, "target cache usage rate (share of branch evaluations reused)")


# Factories with the registry's signature: (steps, layout, router, **params) -> CachePlan.
def _none(steps: int, layout: Sequence[str], _: Router | None) -> CachePlan:
    return none_plan(steps, len(layout))


def _fora(steps: int, layout: Sequence[str], _: Router | None, interval: int) -> CachePlan:
    return fora_plan(steps, len(layout), interval)


def _spread(steps: int, layout: Sequence[str], _: Router | None, usage: float) -> CachePlan:
    return spread_plan(steps, len(layout), max(1, round(steps * (1 - usage))))


def _delta(steps: int, layout: Sequence[str], _: Router | None, interval: int, usage: float) -> CachePlan:
    return delta_plan(steps, layout, usage, interval)


# A router method's threshold defaults to the router file's own, which validation fills in; a library caller
# that gives none gets DEFAULT_THRESHOLD, the value every router is trained with unless told otherwise.
def _l2c(_: int, __: Sequence[str], router: Router, threshold: float | None) -> CachePlan:
    return l2c_plan(router, DEFAULT_THRESHOLD if threshold is None else threshold)


def _harmonica(_: int, __: Sequence[str], router: Router, threshold: float | None) -> CachePlan:
    """HarmoniCa: compute branch i at step k iff sigmoid(P[k, i]) > threshold; step 0 always computes."""
    return router.plan(DEFAULT_THRESHOLD if threshold is None else threshold)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("none", "no caching: every branch computes at every step", _none),
        MethodSpec("fora", "FORA: all branches every n-th step (interval n), reused in between", _fora, (INTERVAL,)),
        MethodSpec(
            "spread",
            "FORA with a fractional interval: all branches at round(steps x (1 - usage)) steps spread evenly, "
            "reused in between",
            _spread,
            (USAGE,),
        ),
        MethodSpec(
            "delta",
            "Delta-DiT-style static schedule: between full steps every `interval`, reuse the rear blocks early and "
            "the front blocks late, as many as reach the target `usage`",
            _delta,
            (INTERVAL, USAGE),
            check=check_delta,
        ),
        MethodSpec(
            "l2c",
            "Learning-to-Cache: alternate full steps and router-decided steps (needs an l2c router)",
            _l2c,
            (THRESHOLD,),
            needs_router=True,
        ),
        MethodSpec(
            "harmonica",
            "HarmoniCa: a learned router decides each branch at each step (needs a router)",
            _harmonica,
            (THRESHOLD,),
            needs_router=True,
        ),
    )
}
NEEDS_ROUTER = frozenset(name for name, spec in METHODS.items() if spec.needs_router)


def parameters() -> dict[str, Param]:
    """Every method parameter by name (methods that share a name share the `Param`)."""
    found: dict[str, Param] = {param.name: param for param in COMMON_PARAMS}
    for spec in METHODS.values():
        for param in spec.params:
            if found.setdefault(param.name, param) is not param:
                raise ValueError(f"two methods define the parameter {param.name!r} differently")
    return found


def methods_using(param: Param) -> str:
    """The names of the methods that take `param`, for help texts."""
    if param in COMMON_PARAMS:
        return "every method"
    return ", ".join(name for name, spec in METHODS.items() if param in spec.params)


def make_plan(method: str, steps: int, layout: Sequence[str], router: Router | None = None, **params: Any) -> CachePlan:
    """One entry for every method name in `METHODS`; `params` are its parameters (None: the default)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method].plan(steps, layout, router, **params)


def plan_from_request(
    acceleration: Mapping[str, Any], steps: int, layout: Sequence[str], router: Router | None
) -> CachePlan:
    """The plan a validated request's `acceleration` (method, router_id and the parameters) asks for."""
    params = {name: acceleration.get(name) for name in parameters()}
    return make_plan(acceleration["method"], steps, layout, router, **params)
