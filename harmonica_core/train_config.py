"""Router training settings, without torch: the CLI's flags and the HTTP training request are derived
from `TrainConfig`'s fields, defaults and help texts, so the three never disagree."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from types import NoneType
from typing import Any, get_args, get_type_hints

from .cache.methods import DEFAULT_THRESHOLD
from .catalog import LAMBDA_MODES, OBJECTIVES, OPTIMIZER_STATES, SCHEDULER_NAMES
from .validation import validate_training

EVAL_SAMPLES = 100  # images generated to measure a trained router's quality


def _help(text: str, choices: Sequence[str] = ()) -> dict[str, Any]:
    return {"help": text, "choices": tuple(choices)}


@dataclass
class TrainConfig:
    """Router training settings; stored in the router file's metadata.

    `iterations` counts router updates (T - 1 per SDT trajectory, or one per `credit_steps` steps; one per
    trajectory for the image objective). `beta`
    weighs the sum of router values per step (pushes towards reuse); its scale depends on N and on the scale of
    lambda.
    """

    objective: str = field(
        default="iepo",
        metadata=_help(
            "iepo: HarmoniCa (SDT + image-error proxy); ltc: SDT without the proxy; l2c: Learning-to-Cache from "
            "real data; image: the final image's own error through the whole trajectory, at the target speedup's "
            "plan (needs target_speedup; T student passes in memory)",
            OBJECTIVES,
        ),
    )
    steps: int = field(default=20, metadata=_help("sampling steps T the router is for (it only runs at this T)"))
    scheduler: str = field(default="ddim", metadata=_help("sampler the router is for", SCHEDULER_NAMES))
    iterations: int = field(default=380, metadata=_help("router updates"))
    batch_size: int = field(default=8, metadata=_help("samples per training trajectory"))
    lr: float = field(
        default=0.1, metadata=_help("Adam learning rate (the image objective: 0.05, README, decayed on a cosine to 0)")
    )
    beta: float = field(default=1e-6, metadata=_help("weight of the reuse pressure; higher = more cache use"))
    tau: float = field(
        default=DEFAULT_THRESHOLD, metadata=_help("cache-update threshold in training and the default at inference")
    )
    lambda_every: int = field(default=95, metadata=_help("iepo: router updates between refreshes of the proxy weights"))
    lambda_mode: str = field(
        default="cumulative", metadata=_help("iepo: how the proxy weights are measured", LAMBDA_MODES)
    )
    forecast: int = field(
        default=0,
        metadata=_help(
            "what a reused branch returns, in training and then at inference: 0 its last output, 1 or 2 a forecast "
            "of that order (the router learns where forecasting is safe; the image objective also learns how far "
            "to trust each term of it, per step and branch, starting from the first order)"
        ),
    )
    target_speedup: float | None = field(
        default=None,
        metadata=_help(
            "aim the router at this theoretical speedup (MACs, e.g. 2.0): beta is adapted at every update (dual "
            "ascent on the speedup constraint) and `beta` is only where it starts; unset: beta stays as given"
        ),
    )
    credit_steps: int = field(
        default=1,
        metadata=_help(
            "steps per router update: the loss of each step in the window also reaches the router values that "
            "refreshed the cache it reads (credit for refreshing); 1 is the paper's one update per step"
        ),
    )
    optimizer_state: str = field(
        default="table",
        metadata=_help(
            "table: one AdamW over all router rows, each stepping at every update (rows move on their momentum); "
            "rows: one state per row, stepping only when an update reaches it (the released code's)",
            OPTIMIZER_STATES,
        ),
    )
    guidance: float = field(default=1.5, metadata=_help("guidance scale of the trajectories"))
    seed: int = field(default=0, metadata=_help("seed of the training batches"))
    # False: the released code's cost (weights take gradients, teacher keeps a graph); for benchmarks only
    frozen: bool = field(default=True, metadata={"internal": True})

    def validate(self) -> None:
        """The bounds every entry point applies (`validation.TRAINING_BOUNDS`); data is the caller's concern."""
        validate_training(asdict(self), None, data=True)


@dataclass(frozen=True)
class Setting:
    """One user-facing training setting: the CLI flag `--<name>` and the HTTP field `<name>`; `type` is the
    value's (an optional setting's default is None)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...]


def settings() -> list[Setting]:
    """TrainConfig's user-facing fields, in order, with their types, defaults, help and choices."""
    types = {
        name: next((t for t in get_args(hint) if t is not NoneType), hint)
        for name, hint in get_type_hints(TrainConfig).items()
    }
    return [
        Setting(f.name, types[f.name], f.default, f.metadata["help"], f.metadata["choices"])
        for f in fields(TrainConfig)
        if not f.metadata.get("internal")
    ]


def plan_method(objective: str) -> str:
    """The inference method a router trained with `objective` runs under (L2C alternates full steps)."""
    return "l2c" if objective == "l2c" else "harmonica"
