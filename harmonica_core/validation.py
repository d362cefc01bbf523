"""One validation of generation and training requests, shared by the CLI, the gateway and the workers.

Torch-free (the gateway never imports torch), so a request is refused before any weights load, with
an `InvalidRequest` naming the field. The operator limits (`Limits`, read from `HARMONICA_MAX_*`) and
the static bounds (`GENERATION_BOUNDS`, `TRAINING_BOUNDS`, also the API schema's constraints) are
defined here only, so every entry point refuses the same requests. Checks that need the model catalog
apply to catalog models; a local folder's family is only known once it loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import operator
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .cache.methods import DEFAULT_THRESHOLD, METHODS, NEEDS_ROUTER, parameters
from .catalog import LAMBDA_MODES, MODELS, OBJECTIVES, OPTIMIZER_STATES, SCHEDULER_NAMES, read_router_metadata
from .errors import InvalidRequest
from .families import FAMILIES

__all__ = [
    "GENERATION_BOUNDS",
    "TRAINING_BOUNDS",
    "Limits",
    "RouterInfo",
    "check_router",
    "default_class_labels",
    "validate_generation",
    "validate_training",
]


@dataclass(frozen=True)
class Limits:
    """The operator's limits. The gateway's settings take their defaults and floors from here, and the CLI
    reads the same `HARMONICA_<NAME>` variables, so both refuse the same requests under one environment."""

    max_steps: int = field(default=100, metadata={"ge": 2})
    max_images_per_job: int = field(default=64, metadata={"ge": 1})
    max_resolution: int = field(default=1024, metadata={"ge": 8})
    max_prompt_chars: int = field(default=1000, metadata={"ge": 1})
    max_train_iterations: int = field(default=20000, metadata={"ge": 1})
    max_train_batch_size: int = field(default=64, metadata={"ge": 1})
    max_eval_samples: int = field(default=500, metadata={"ge": 1})
    max_train_gpus: int = field(default=1, metadata={"ge": 1})  # processes of one training job (GPUs on CUDA)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < f.metadata["ge"]:
                raise ValueError(
                    f"HARMONICA_{f.name.upper()} must be >= {f.metadata['ge']}, got {getattr(self, f.name)}"
                )

    @classmethod
    def setting(cls, name: str) -> dict[str, int]:
        """Keyword arguments of the pydantic `Field` that declares this limit in the gateway's settings."""
        spec = next(f for f in fields(cls) if f.name == name)
        return {"default": spec.default, "ge": spec.metadata["ge"]}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """The limits `HARMONICA_MAX_*` set (names matched case-insensitively, as pydantic-settings does)."""
        env = {key.lower(): value for key, value in environ.items()}
        values = {}
        for f in fields(cls):
            text = env.get(f"harmonica_{f.name}")
            if text is not None:
                try:
                    values[f.name] = int(text)
                except ValueError:
                    raise ValueError(f"HARMONICA_{f.name.upper()} must be an integer, got {text!r}") from None
        return cls(**values)

    @classmethod
    def of(cls, settings: object) -> Limits:
        """The limits of an object with attributes of the same names (the gateway's and workers' settings)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


# Static bounds per field, as pydantic `Field` constraints (ge, gt, le, lt); `app.schemas` declares them from here.
_GUIDANCE = {"ge": 1, "le": 30}
_SEED = {"ge": 0, "le": 2**32 - 1}
GENERATION_BOUNDS: dict[str, dict[str, float]] = {
    "num_images": {"ge": 1},
    "steps": {"ge": 1},
    "guidance": _GUIDANCE,
    "seed": _SEED,
    "height": {"ge": 8},
    "width": {"ge": 8},
    **{f"acceleration.{name}": dict(param.bounds) for name, param in parameters().items()},
}
TRAINING_BOUNDS: dict[str, dict[str, float]] = {
    "steps": {"ge": 2},
    "iterations": {"ge": 1},
    "batch_size": {"ge": 1},
    "lr": {"gt": 0, "le": 10},
    "beta": {"ge": 0, "le": 1},
    "tau": {"gt": 0, "lt": 1},
    "lambda_every": {"ge": 1},
    "guidance": _GUIDANCE,
    "seed": _SEED,
    "eval_samples": {"ge": 1},
    "gpus": {"ge": 1},
    "forecast": {"ge": 0, "le": 2},
    "target_speedup": {"gt": 1, "le": 20},
    "credit_steps": {"ge": 1},
}
_HOLDS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
_SYMBOL = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _describe(bound: Mapping[str, float]) -> str:
    """'in [0, 1]', 'in (0, 10]' or '>= 1': how an error message states a bound."""
    low = [f"{'[' if op == 'ge' else '('}{bound[op]}" for op in ("ge", "gt") if op in bound]
    high = [f"{bound[op]}{']' if op == 'le' else ')'}" for op in ("le", "lt") if op in bound]
    if low and high:
        return f"in {low[0]}, {high[0]}"
    return " and ".join(f"{_SYMBOL[op]} {limit}" for op, limit in bound.items())


def _check_bounds(request: Mapping[str, Any], bounds: Mapping[str, Mapping[str, float]]) -> None:
    for name, bound in bounds.items():
        value: Any = request
        for part in name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None and not all(_HOLDS[op](value, limit) for op, limit in bound.items()):
            raise InvalidRequest(name, f"{name.rsplit('.', 1)[-1]} must be {_describe(bound)}, got {value}")


def _choice(name: str, value: Any, choices: Collection[str]) -> None:
    if value is not None and value not in choices:
        raise InvalidRequest(name, f"unknown {name.rsplit('.', 1)[-1]} {value!r}; choose one of {', '.join(choices)}")


def _limit(name: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        raise InvalidRequest(name, f"{what} is {value}; at most {limit} is allowed here")


def default_class_labels(num_classes: int) -> list[int]:
    """The labels a class-conditional request without any gets: the first ten classes."""
    return list(range(min(num_classes, 10)))


@dataclass(frozen=True)
class RouterInfo:
    """What a router was trained for, from its file's metadata (no torch): enough to refuse a mismatch early.

    The authoritative check (model fingerprint, scheduler config, timesteps) still runs when it loads.
    """

    name: str  # its id or path, for messages
    model: str
    scheduler: str
    steps: int
    method: str
    threshold: float
    forecast: int = 0  # the reuse it was trained with (0: copy)

    @classmethod
    def from_metadata(cls, name: str, metadata: Mapping[str, Any]) -> RouterInfo:
        return cls(
            name=name,
            model=metadata.get("model_name", ""),
            scheduler=metadata.get("training", {}).get("scheduler", ""),
            steps=int(metadata["target"]["steps"]),
            method=metadata["method"],
            threshold=metadata.get("threshold", DEFAULT_THRESHOLD),
            forecast=int(metadata.get("training", {}).get("forecast", 0)),
        )

    @classmethod
    def read(cls, path: str | Path) -> RouterInfo:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no router file at {path}")
        return cls.from_metadata(str(path), read_router_metadata(path))


def check_router(router: RouterInfo, model: str, steps: int, scheduler: str, method: str) -> None:
    """Refuse a router trained for another model, step count or scheduler, or run under another method.

    Model names are not compared for a local folder, which may be spelled several ways; its weights'
    fingerprint is compared when the router loads.
    """
    local_folder = model not in MODELS and Path(model).expanduser().is_dir()
    for name, wanted, trained in (
        ("model", None if local_folder else model, router.model),
        ("steps", steps, router.steps),
        ("scheduler", scheduler, router.scheduler),
    ):
        if wanted is not None and wanted != trained:
            raise InvalidRequest(name, f"router {router.name} was trained for {name} {trained!r}, not {wanted!r}")
    if router.method != method:
        raise InvalidRequest("acceleration.method", f"router {router.name} runs under method {router.method!r}")


def validate_generation(
    request: Mapping[str, Any], limits: Limits, router: RouterInfo | None = None, *, router_help: str = "a router"
) -> dict[str, Any]:
    """The request (the API's `GenerateRequest` fields, `acceleration` nested) checked and normalized: a copy
    with class labels and the router's threshold filled in. `router` is the router `acceleration.router_id`
    names, read by the caller; `router_help` says in the error how to name one."""
    req = copy.deepcopy(dict(request))
    accel = req["acceleration"]
    _choice("scheduler", req.get("scheduler"), SCHEDULER_NAMES)
    _choice("acceleration.method", accel.get("method"), METHODS)
    _check_bounds(req, GENERATION_BOUNDS)
    _limit("steps", req["steps"], limits.max_steps, "steps")
    for name in ("class_labels", "prompts"):
        if req.get(name) is not None and not req[name]:
            raise InvalidRequest(name, f"{name} must list at least one entry; omit it for the default")
    model, labels, prompts = req["model"], req.get("class_labels"), req.get("prompts")
    info = MODELS.get(model)
    family = FAMILIES[info.family] if info is not None else None  # a local folder's is known once it loads
    if family is not None and family.class_conditional:
        if prompts is not None:
            raise InvalidRequest("prompts", f"{model} is class-conditional: give class_labels, not prompts")
        labels = req["class_labels"] = labels or default_class_labels(info.num_classes)
        if any(not 0 <= label < info.num_classes for label in labels):
            raise InvalidRequest("class_labels", f"class labels must be in [0, {info.num_classes - 1}] for {model}")
    else:
        if family is not None and (labels is not None or not prompts):
            raise InvalidRequest("prompts", f"{model} is text-to-image: give prompts, not class_labels")
        if prompts:
            longest = max(len(prompt) for prompt in prompts)
            _limit("prompts", longest, limits.max_prompt_chars, "the longest prompt's length in characters")
    largest = limits.max_resolution if info is None else min(info.max_size, limits.max_resolution)
    for side in ("height", "width"):
        value = req.get(side)
        if value is None:
            continue
        if family is not None and family.size_multiple is None:  # the model's own size only
            if value != info.size:
                raise InvalidRequest(side, f"{model} generates {info.size}x{info.size} images only; omit {side}")
        elif family is not None and value % family.size_multiple:
            raise InvalidRequest(side, f"{side} must be a multiple of {family.size_multiple}, got {value}")
        else:
            _limit(side, value, largest, side)
    groups = len(labels or prompts or [None])
    _limit("num_images", groups * req["num_images"], limits.max_images_per_job, "the number of images in this job")
    method = accel["method"]
    spec = METHODS[method]
    if spec.check is not None:
        try:
            spec.check(req["steps"], **spec.values(**accel))
        except InvalidRequest as error:
            raise InvalidRequest(f"acceleration.{error.field}", str(error)) from None
    if method not in NEEDS_ROUTER:
        if accel.get("router_id") is not None:
            raise InvalidRequest("acceleration.router_id", f"method {method} uses no router; use l2c or harmonica")
    elif router is None:
        raise InvalidRequest("acceleration.router_id", f"method {method} needs {router_help}")
    else:
        check_router(router, model, req["steps"], req["scheduler"], method)
        if accel.get("threshold") is None:
            accel["threshold"] = router.threshold
        if accel.get("forecast") is None:  # the reuse the router learned its plan under
            accel["forecast"] = router.forecast
    if accel.get("forecast") is None:
        accel["forecast"] = 0
    return req


BATCH_FIELDS = ("steps", "scheduler", "guidance", "height", "width")
"""What generation requests sharing one denoising batch must agree on, besides the model and the whole
acceleration (the plan); seeds, conditions and image counts may differ."""


def batch_signature(request: Mapping[str, Any]) -> tuple[str, int]:
    """(key, rows) of a validated generation request: requests with equal keys may share a denoising batch, and
    `rows` is how many transformer rows it adds to one (its images, doubled by classifier-free guidance)."""
    shared = {name: request[name] for name in ("model", "acceleration", *BATCH_FIELDS)}
    key = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]
    conditions = request["class_labels"] or request["prompts"] or []
    return key, len(conditions) * request["num_images"] * (2 if request["guidance"] > 1 else 1)


def validate_training(request: Mapping[str, Any], limits: Limits | None, *, data: bool = False) -> dict[str, Any]:
    """The training request (the API's `TrainRouterRequest` fields; absent ones are not checked) checked, as a
    copy. `limits`: the operator's (None: a library call, bounds only). `data`: the caller brings its own real
    data, which the l2c objective needs beyond digits."""
    req = dict(request)
    _choice("objective", req.get("objective"), OBJECTIVES)
    _choice("scheduler", req.get("scheduler"), SCHEDULER_NAMES)
    _choice("lambda_mode", req.get("lambda_mode"), LAMBDA_MODES)
    _choice("optimizer_state", req.get("optimizer_state"), OPTIMIZER_STATES)
    _check_bounds(req, TRAINING_BOUNDS)
    for name, limit in (
        ("steps", "max_steps"),
        ("iterations", "max_train_iterations"),
        ("batch_size", "max_train_batch_size"),
        ("eval_samples", "max_eval_samples"),
        ("gpus", "max_train_gpus"),
    ):
        if limits is not None and req.get(name) is not None:
            _limit(name, req[name], getattr(limits, limit), name)
    if req.get("target_speedup") is not None and req.get("objective") == "l2c":
        raise InvalidRequest(
            "target_speedup", "target_speedup is for the iepo, ltc and image objectives (l2c alternates)"
        )
    if req.get("target_speedup") is not None and req.get("beta") == 0:
        raise InvalidRequest("beta", "with target_speedup, beta is where the adapted beta starts: give one above 0")
    if req.get("objective") == "image" and req.get("target_speedup") is None:
        raise InvalidRequest("target_speedup", "the image objective trains at a target's plan: give target_speedup")
    if req.get("credit_steps", 1) > 1 and req.get("objective") in ("l2c", "image"):
        raise InvalidRequest(
            "credit_steps", "credit_steps is for the iepo and ltc objectives (l2c trains one step, image all of them)"
        )
    if req.get("credit_steps", 1) > 1 and req["credit_steps"] >= req.get("steps", 20):
        raise InvalidRequest(
            "credit_steps",
            f"credit_steps must be below steps ({req.get('steps', 20)}): a trajectory has steps - 1 trained steps",
        )
    if req.get("gpus", 1) > 1 and req.get("batch_size", 8) % req["gpus"]:
        raise InvalidRequest("batch_size", f"batch_size must be a multiple of gpus ({req['gpus']}): each takes a share")
    if req.get("objective") == "l2c" and req.get("model") != "digits" and not data:
        raise InvalidRequest("objective", "l2c trains from real data, which is built in for the digits model only")
    return req
