"""The learnable router, its thresholding into a plan, and its file format (ALGORITHM.md §2).

A router file is one safetensors file: the [T, N] logits (and, where it learned them, its forecast's weights
[T, N, order]) plus JSON metadata under the key `harmonica` that records what it was trained for. Loading it
for another model, scheduler or step count raises `RouterMismatchError` naming the field that differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .cache.methods import DEFAULT_THRESHOLD
from .cache.plan import CachePlan
from .catalog import read_router_metadata

PINNED_LOGIT = 5.0  # row 0: the first step always computes (sigmoid(5) ~ 0.993)
LOGIT_BOUND = 5.0
FORMAT_VERSION = 2  # 2: the inference method is `method`, no longer `quality.method`


class RouterMismatchError(ValueError):
    """A router was used on a model, scheduler or step count it was not trained for."""

    def __init__(self, field_name: str, trained: Any, requested: Any) -> None:
        self.field = field_name
        super().__init__(
            f"router mismatch on {field_name!r}: the router was trained for {trained!r} but this run has "
            f"{requested!r}; train a router for this setting (harmonica train-router) or pick a matching one"
        )


class Router(nn.Module):
    """Logits P [T, N]; r = sigmoid(P) near 1 computes, near 0 reuses. Row 0 is pinned to compute.

    Each trained row (steps 1 to T - 1) is a parameter of its own, as in the released code (a router per step),
    so an optimizer can keep one state and step count per row: a row whose gradient `release_idle_grads` drops
    does not move on its momentum from earlier updates.

    With `forecast` > 0 the router also holds the weights of that order's forecast terms per step and branch
    (`hooks.ForecastReuse`), how far to trust each extrapolation, learned with the plan. They start as the first
    order forecast (1 for the slope, 0 for higher terms): without training it is the best (README).
    """

    def __init__(self, steps: int, branches: int, generator: torch.Generator | None = None, forecast: int = 0) -> None:
        super().__init__()
        logits = torch.randn(steps, branches, generator=generator)
        self.rows = nn.ParameterList(nn.Parameter(row.clone()) for row in logits[1:])
        self.register_buffer("pinned", torch.full((1, branches), PINNED_LOGIT))
        start = torch.zeros(steps, branches, forecast)
        start[..., :1] = 1.0
        self.forecast_weights = nn.Parameter(start) if forecast else None

    @property
    def logits(self) -> torch.Tensor:
        """All logits [T, N], row 0 pinned."""
        return torch.cat([self.pinned, torch.stack(list(self.rows))])

    @property
    def steps(self) -> int:
        return len(self.rows) + 1

    @property
    def branches(self) -> int:
        return self.pinned.shape[1]

    def forward(self) -> torch.Tensor:
        """Router probabilities r [T, N]; row 0 carries no gradient."""
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def load_(self, logits: torch.Tensor, forecast_weights: torch.Tensor | None = None) -> None:
        """Take trained logits [T, N] (row 0 is pinned whatever it holds), and forecast weights where it has them."""
        if tuple(logits.shape) != (self.steps, self.branches):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for a {self.steps} x {self.branches} router")
        for row, values in zip(self.rows, logits[1:], strict=True):
            row.copy_(values)
        if forecast_weights is not None:
            if self.forecast_weights is None or forecast_weights.shape != self.forecast_weights.shape:
                raise ValueError(
                    f"forecast weights of shape {tuple(forecast_weights.shape)} for a {self.steps} x {self.branches} "
                    f"router (they are {self.steps} x {self.branches} x the forecast order)"
                )
            self.forecast_weights.copy_(forecast_weights)

    def release_idle_grads(self) -> None:
        """Between backward and the optimizer step: rows whose gradient is all zero get none, so the optimizer
        skips them (the loss of a step reaches only its own row and the rows its cache entries came from)."""
        for row in self.rows:
            if row.grad is not None and not row.grad.any():
                row.grad = None

    @torch.no_grad()
    def clamp_(self) -> None:
        """After each optimizer step: logits back into [-5, 5]."""
        for row in self.rows:
            row.clamp_(-LOGIT_BOUND, LOGIT_BOUND)

    @property
    def forecast(self) -> int:
        """The forecast order whose weights it learned (0: none)."""
        return 0 if self.forecast_weights is None else self.forecast_weights.shape[2]

    @torch.no_grad()
    def plan(self, threshold: float = DEFAULT_THRESHOLD) -> CachePlan:
        """The static inference plan: compute where r > threshold (computed once per generation), with the
        forecast weights it learned."""
        weights = None if self.forecast_weights is None else self.forecast_weights.tolist()
        return CachePlan.from_rows((self() > threshold).tolist(), self.forecast, weights)


@dataclass(frozen=True)
class RouterTarget:
    """What a router is bound to; compared field by field when a router is loaded."""

    architecture: str
    model_fingerprint: str
    branch_layout: list[str]
    scheduler_class: str
    scheduler_config: dict[str, Any]
    steps: int
    timesteps: list[int]


@dataclass
class RouterMetadata:
    target: RouterTarget
    threshold: float = DEFAULT_THRESHOLD
    model_name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    method: str = "harmonica"  # the cache method it runs under (`l2c` routers alternate full steps)
    plan: list[list[bool]] = field(default_factory=list)  # its plan at `threshold` (T x N computes), for readers
    # without torch (the gateway's router pages); empty in files written before it was recorded
    format_version: int = FORMAT_VERSION


def save_router(path: str | Path, router: Router, metadata: RouterMetadata) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if router.steps != metadata.target.steps or router.branches != len(metadata.target.branch_layout):
        raise ValueError("router shape does not match its metadata (steps x branch layout)")
    blob = json.dumps(asdict(metadata), sort_keys=True)
    tensors = {"logits": router.logits, "forecast_weights": router.forecast_weights}
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items() if t is not None}
    save_file(tensors, str(path), {"harmonica": blob})
    return path


def read_router(path: str | Path) -> tuple[Router, RouterMetadata]:
    """Read a router file without checking it against a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no router file at {path}")
    data = read_router_metadata(path)
    metadata = RouterMetadata(**{**data, "target": RouterTarget(**data["target"])})
    tensors = load_file(str(path))
    logits, weights = tensors["logits"], tensors.get("forecast_weights")
    router = Router(*logits.shape, forecast=0 if weights is None else weights.shape[-1])  # load_ checks the rest
    router.load_(logits, weights)
    return router, metadata


def load_router(path: str | Path, target: RouterTarget) -> tuple[Router, RouterMetadata]:
    """Read a router and refuse it unless it was trained for `target`."""
    router, metadata = read_router(path)
    check_target(metadata.target, target)
    return router, metadata


def check_target(trained: RouterTarget, requested: RouterTarget) -> None:
    for name in ("architecture", "branch_layout", "model_fingerprint", "scheduler_class", "steps", "timesteps"):
        if getattr(trained, name) != getattr(requested, name):
            raise RouterMismatchError(name, getattr(trained, name), getattr(requested, name))
    for key in sorted(set(trained.scheduler_config) | set(requested.scheduler_config)):
        if trained.scheduler_config.get(key) != requested.scheduler_config.get(key):
            raise RouterMismatchError(
                f"scheduler_config.{key}", trained.scheduler_config.get(key), requested.scheduler_config.get(key)
            )
