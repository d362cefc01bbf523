"""Router training: Step-Wise Denoising Training with the IEPO or LTC objective, and the data-based
Learning-to-Cache baseline (ALGORITHM.md §3-5).

One call, `train_router`, serves the CLI and the service: it reports progress through a callback (raise
`TrainingCancelled` there to stop between updates), writes a checkpoint at every trajectory boundary and
resumes from it with the same result as an uninterrupted run. Given a `World` of several processes
(`distributed.py`), each runs its share of every batch and the router's gradients are averaged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache.hooks import CacheConfig, CacheState, branch_cache, reuse_strategy
from .cache.methods import spread_plan
from .cache.plan import CachePlan
from .distributed import ALONE, World
from .families import Conditioning
from .models import Model
from .router import Router, RouterMetadata, save_router
from .sampling import GenerationRequest, PromptEmbeddings, predict_noise, step_kwargs
from .train_config import TrainConfig, plan_method

DEFAULT_CAPTIONS = (
    "a photograph of a cat sitting on a windowsill",
    "a red sports car on a mountain road",
    "a bowl of fresh fruit on a wooden table",
    "an astronaut riding a horse, oil painting",
    "a lighthouse at sunset over a calm sea",
    "a city street in the rain at night, neon lights",
    "a snowy forest with a small cabin",
    "a portrait of an old man with a beard",
)


class TrainingCancelled(RuntimeError):
    """Raised by a progress callback to stop training between router updates."""


@dataclass
class TrainData:
    """Where conditions (and, for L2C, clean samples) come from; defaults suit the model's family."""

    captions: tuple[str, ...] = DEFAULT_CAPTIONS  # PixArt with a text encoder
    prompt_embeddings: PromptEmbeddings | None = None  # PixArt without one: rows are drawn per batch
    samples: torch.Tensor | None = None  # L2C: clean latents/pixels [M, C, H, W]
    labels: torch.Tensor | None = None  # L2C on DiT: their class labels [M]


@dataclass
class TrainProgress:
    """Where a training run is: `phase` "updates" after each router update; "lambdas" after each of the
    `lambda_passes` full sampling passes that estimate the IEPO weights before the first update and at every
    refresh, when no update happens for a while (`loss` is then that of the last update, None before one)."""

    iteration: int
    total: int
    loss: float | None
    cache_usage_rate: float  # at the training threshold (tau; the image objective's plan at the target)
    lambdas: list[float] = field(default_factory=list)
    phase: str = "updates"
    lambda_pass: int = 0
    lambda_passes: int = 0
    theoretical_speedup: float = 1.0  # of the plan at tau
    beta: float = 0.0  # the current one (adapted with a target speedup)

    def as_dict(self) -> dict[str, Any]:
        """The job progress record (JSON): the lambda-pass fields only in that phase."""
        keys = ["phase", "iteration", "total", "loss", "cache_usage_rate", "theoretical_speedup", "beta"]
        keys += ["lambda_pass", "lambda_passes"] if self.phase == "lambdas" else []
        return {key: getattr(self, key) for key in keys}


ProgressCallback = Callable[[TrainProgress], None]


@dataclass
class _Checkpoint:
    logits: torch.Tensor
    optimizer: dict[str, Any]
    updates: int
    lambdas: list[float]
    next_refresh: int
    generator: torch.Tensor
    config: dict[str, Any]
    beta: float | None = None  # adapted towards a target speedup (None in checkpoints from before it)
    forecast_weights: torch.Tensor | None = None  # the image objective's, with a forecast


def cache_usage_at(probs: torch.Tensor, tau: float) -> float:
    """Share of router entries at or below the threshold: the planned cache usage rate."""
    return (probs <= tau).float().mean().item()


def plan_speedups(model: Model, config: TrainConfig) -> Callable[[torch.Tensor, float], float]:
    """speedup(router values, threshold): the theoretical speedup (MACs) of the plan they give at the config's
    steps and guidance; step 0 always computes."""
    profile = model.mac_profile(*model.check_size(None, None))
    cfg = config.guidance > 1
    full = profile.generation_macs(None, config.steps, cfg)

    def speedup(probs: torch.Tensor, threshold: float) -> float:
        reused = (probs <= threshold).tolist()
        reused[0] = [False] * len(reused[0])
        return full / profile.generation_macs(reused, config.steps, cfg)

    return speedup


def threshold_for(model: Model, router: Router, config: TrainConfig) -> float:
    """The inference threshold whose plan comes closest to `config.target_speedup` (tau where none is set).

    Dual ascent steers training towards the target, but the plan at tau trails beta's last moves; the router's
    ranking of its entries is what it learned, so the threshold that lands the target is read off it.
    """
    if config.target_speedup is None:
        return config.tau
    return closest_threshold(router().detach(), plan_speedups(model, config), config.target_speedup, config.tau)


def closest_threshold(
    probs: torch.Tensor, speedup: Callable[[torch.Tensor, float], float], target: float, tau: float
) -> float:
    """Among tau and the router values themselves (the only places the plan changes), the threshold whose plan's
    speedup is closest to `target`; of equals, the nearest tau."""
    candidates = sorted({tau, *probs[1:].flatten().tolist()}, key=lambda t: abs(math.log(t / tau)))
    return min(candidates, key=lambda t: abs(math.log(speedup(probs, t) / target)))


def spread_logits(model: Model, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Where the image objective starts: the spread plan (`cache.methods.spread_plan`) closest to the target (FORA
    n = 2 at 2x), as logits +-1 with a little noise: from random logits a prototype found worse plans (README, "The
    image objective")."""
    steps, branches, speedup = config.steps, len(model.branch_layout), plan_speedups(model, config)

    def plan(computing: int) -> torch.Tensor:
        return torch.tensor(spread_plan(steps, branches, computing).compute, dtype=torch.float32)

    best = min(range(1, steps + 1), key=lambda m: abs(math.log(speedup(plan(m), 0.5) / config.target_speedup)))
    return 2 * plan(best) - 1 + 0.1 * torch.randn(steps, branches, generator=generator)


DUAL_STEP = 0.05  # beta *= exp(DUAL_STEP * log(target / reached)) per update: x1.035 per update at 2x for 1x


@dataclass
class _Run:
    """What one training run shares: the model and its cache, the config and data, the router and its
    optimizer, the batch generator, the IEPO weights and when they are next refreshed."""

    model: Model
    config: TrainConfig
    data: TrainData
    state: CacheState
    router: Router
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    on_progress: ProgressCallback | None
    lambdas: list[float]
    world: World
    beta: float
    next_refresh: int = 0
    loss: float | None = None  # of the last update (its mean over the ranks)
    threshold: float = field(init=False)  # of the plan training runs and reports: tau, or the image objective's

    def __post_init__(self) -> None:
        self.threshold = self.config.tau

    @cached_property
    def latent(self) -> tuple[int, int, int, int]:
        return self.model.latent_shape(self.config.batch_size, *self.model.check_size(None, None))

    @cached_property
    def speedup_at(self) -> Callable[[torch.Tensor, float], float]:
        """The theoretical speedup of the plan router values give at a threshold."""
        return plan_speedups(self.model, self.config)

    def speedup(self, probs: torch.Tensor) -> float:
        """The theoretical speedup of the plan router values give at the training threshold."""
        return self.speedup_at(probs, self.threshold)

    @cached_property
    def parallel(self) -> torch.nn.Module:
        """The router as the loss sees it: under DDP when there are several processes."""
        return self.world.parallel(self.router)

    @cached_property
    def branch_costs(self) -> torch.Tensor:
        """Each branch's MACs over their mean: the image objective prices a value by the compute it decides."""
        macs = self.model.mac_profile(*self.model.check_size(None, None)).branch_macs
        costs = torch.tensor(macs, dtype=torch.float64)
        return (costs / costs.mean()).float()

    def scheduler(self) -> Any:
        """A fresh scheduler per trajectory: multistep solvers keep per-trajectory state."""
        return self.model.make_scheduler(self.config.scheduler, self.config.steps)

    def batch(self) -> tuple[torch.Tensor, Conditioning, torch.Tensor | None]:
        """Noise x_T, the CFG conditioning, and (L2C) clean samples, all drawn from the run's generator: the global
        batch, of which this process keeps its share."""
        b, model, data, generator = self.config.batch_size, self.model, self.data, self.generator
        share = self.world.share
        noise = share(torch.randn(self.latent, generator=generator)).to(model.device, model.dtype)
        clean = rows = None
        if self.config.objective == "l2c":
            if data.samples is None:
                raise ValueError("the l2c objective trains from real data: give TrainData.samples")
            rows = torch.randint(len(data.samples), (b,), generator=generator)
            clean = share(data.samples[rows]).to(model.device, model.dtype)
        conditions = model.spec.training_conditions(model, data, b, generator, rows)
        conditions = {name: share(value) for name, value in conditions.items()}
        request = GenerationRequest(steps=self.config.steps, guidance=self.config.guidance, **conditions)
        return noise, model.spec.conditioning(model, request), clean

    def eps(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, teacher: bool = False):
        """Teacher: no cache read or write, no graph. Student: soft mix with the cache."""
        if not teacher:
            return predict_noise(self.model, scheduler, x, t, cond, self.config.guidance)
        with self.state.teacher(), torch.set_grad_enabled(not self.config.frozen):
            return predict_noise(self.model, scheduler, x, t, cond, self.config.guidance)

    def sample(
        self, noise: torch.Tensor, cond: Conditioning, eps: list[torch.Tensor] | None = None, teacher: bool = False
    ) -> torch.Tensor:
        """x_0 (latents/pixels) of a full trajectory from `noise`: the teacher's, or the student's with the router
        values in use (in the graph unless under no_grad); each step's noise prediction is appended to `eps` where
        given."""
        self.state.reset()
        scheduler, x = self.scheduler(), noise
        extra = step_kwargs(scheduler, self.config.seed)
        for t in scheduler.timesteps:
            predicted = self.eps(scheduler, x, t, cond, teacher)
            if eps is not None:
                eps.append(predicted)
            x = scheduler.step(predicted, t, x, **extra, return_dict=False)[0]
        return x

    @torch.no_grad()
    def final(
        self, noise: torch.Tensor, cond: Conditioning, weights: torch.Tensor, eps: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x_0 of a full trajectory with fixed soft router values `weights` [T, N] (`sample`)."""
        self.state.use_weights(weights)
        return self.sample(noise, cond, eps)

    def update(self, loss: torch.Tensor, updates: int, reported: torch.Tensor | None = None) -> int:
        """One optimizer step on the router; reports progress (with `reported` as the loss where given); returns the
        new update count."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the gradient arrives averaged over the ranks
        self.state.detach()
        if self.config.optimizer_state == "rows":
            self.router.release_idle_grads()
        self.optimizer.step()
        self.router.clamp_()
        self.loss = self.world.mean((loss if reported is None else reported).detach()).item()
        if self.config.target_speedup is not None and self.config.objective != "image":
            # dual ascent: more reuse pressure while below the target
            reached = self.speedup(self.router().detach())
            self.beta *= math.exp(DUAL_STEP * math.log(self.config.target_speedup / reached))
        self.report(updates + 1)
        return updates + 1

    def report(self, updates: int, lambda_pass: int = 0) -> None:
        """Progress after an update, or (`lambda_pass` > 0) after a pass of the lambda estimation; rank 0 reports."""
        if self.on_progress is None or not self.world.main:
            return
        probs = self.router().detach()
        lambdas = [] if self.config.objective == "l2c" else list(self.lambdas)
        cur = cache_usage_at(probs, self.threshold)
        progress = TrainProgress(updates, self.config.iterations, self.loss, cur, lambdas)
        progress.theoretical_speedup, progress.beta = self.speedup(probs), self.beta
        if lambda_pass:
            progress.phase, progress.lambda_pass, progress.lambda_passes = "lambdas", lambda_pass, self.config.steps
        self.on_progress(progress)

    @torch.no_grad()
    def estimate_lambdas(
        self, noise: torch.Tensor, cond: Conditioning, probs: torch.Tensor, updates: int
    ) -> list[float]:
        """IEPO weights lambda_k (ALGORITHM.md §4) over the global batch; deterministic given the batch, no global
        RNG touched. Its T full sampling passes are reported one by one: they can take minutes before the first
        update.

        `gain` (ours, not the paper's) divides the cumulative mode's final-image change by the change of the noise
        prediction at step k that caused it, from the same passes: the image error per unit of step-k error. The
        paper's lambda is that gain times step k's own current error, which is tiny at early, noisy steps, so a
        long-held early cache looked cheap to it."""
        steps, ones, mse = self.config.steps, torch.ones_like(probs), lambda a, b: self.world.mean(F.mse_loss(a, b))
        result = [0.0] * steps
        if self.config.lambda_mode in ("cumulative", "gain"):
            weights, gain = ones.clone(), self.config.lambda_mode == "gain"
            before: list[torch.Tensor] = []
            previous = self.final(noise, cond, weights, before)
            self.report(updates, lambda_pass=1)
            for k in range(1, steps):
                weights[k] = probs[k]
                after: list[torch.Tensor] = []
                current = self.final(noise, cond, weights.clone(), after)
                self.report(updates, lambda_pass=k + 1)
                result[k] = mse(current, previous).item()
                if gain:
                    caused = mse(after[k], before[k]).item()
                    result[k] = result[k] / caused if caused > 0 else 0.0
                previous, before = current, after
        else:
            cached = self.final(noise, cond, probs)
            self.report(updates, lambda_pass=1)
            for k in range(1, steps):
                weights = probs.clone()
                weights[k] = 1.0
                result[k] = mse(cached, self.final(noise, cond, weights)).item()
                self.report(updates, lambda_pass=k + 1)
        return result


def train_router(
    model: Model,
    config: TrainConfig,
    data: TrainData | None = None,
    on_progress: ProgressCallback | None = None,
    checkpoint: Path | None = None,
    world: World = ALONE,
) -> Router:
    """Train a router for `model` at `config.steps` steps of `config.scheduler`.

    With `checkpoint`, state is saved there at every trajectory boundary (and at the end; by rank 0) and a run
    finding a checkpoint of the same config resumes from it, whatever the number of processes that wrote it.
    """
    config.validate()
    world.check_batch(config.batch_size)
    data = data or TrainData()
    generator = torch.Generator().manual_seed(config.seed)
    learns_forecast = config.forecast if config.objective == "image" else 0
    router = Router(config.steps, len(model.branch_layout), generator=generator, forecast=learns_forecast)
    if config.objective == "image":
        router.load_(spread_logits(model, config, generator))
    router = router.to(model.device)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    updates, next_refresh, beta = 0, 0, config.beta
    lambdas = [1.0] * config.steps
    if checkpoint is not None and checkpoint.is_file():
        saved = _Checkpoint(**torch.load(checkpoint, weights_only=False))
        if saved.config != asdict(config):
            raise ValueError(f"checkpoint {checkpoint} was written for another training config; delete it or match it")
        router.load_(saved.logits, saved.forecast_weights)
        optimizer.load_state_dict(saved.optimizer)
        updates, lambdas, next_refresh = saved.updates, saved.lambdas, saved.next_refresh
        beta = config.beta if saved.beta is None else saved.beta
        generator.set_state(saved.generator)

    soft = CacheConfig(
        soft_weights=router().detach(),
        update_threshold=config.tau,
        reuse=reuse_strategy(config.forecast, router.forecast_weights),
    )
    step = {"l2c": _l2c_update, "image": _image_update}.get(config.objective, _sdt_trajectory)
    model.transformer.requires_grad_(not config.frozen)
    try:
        with branch_cache(model.transformer, soft) as state:
            run = _Run(
                model,
                config,
                data,
                state,
                router,
                optimizer,
                generator,
                on_progress,
                lambdas,
                world,
                beta,
                next_refresh,
            )
            while updates < config.iterations:
                if checkpoint is not None and world.main:
                    _save(checkpoint, run, updates)
                if config.objective == "image":  # cosine decay: a late batch of outliers cannot undo the run
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * (1 + math.cos(math.pi * updates / config.iterations)) / 2
                updates = step(run, updates)
    finally:
        model.transformer.requires_grad_(False)
        model.transformer.zero_grad(set_to_none=True)
    if checkpoint is not None and world.main:
        _save(checkpoint, run, updates)
    return router


def _sdt_trajectory(run: _Run, updates: int) -> int:
    """One SDT trajectory (ALGORITHM.md §3), the student driving x_t: a router update every `credit_steps` steps
    (T - 1 updates at the paper's 1), on the summed loss of the steps since the last one, which all mix with the
    same router values; the cache stays in their graph, so a step's error also reaches the values that refreshed
    the entries it read within the window."""
    config, state, router = run.config, run.state, run.router
    noise, cond, _ = run.batch()
    if config.objective == "iepo" and updates >= run.next_refresh:
        run.lambdas = run.estimate_lambdas(noise, cond, router().detach(), updates)
        run.next_refresh = updates + config.lambda_every
    state.reset()  # a new trajectory starts with an empty cache
    scheduler, x = run.scheduler(), noise
    extra = step_kwargs(scheduler, config.seed)
    window: list[torch.Tensor] = []  # the losses of the steps since the last update
    last = len(scheduler.timesteps) - 1
    for k, t in enumerate(scheduler.timesteps):
        if k == 0:  # full compute fills the cache; no loss
            state.use_weights(router().detach())
            with torch.no_grad():
                eps = run.eps(scheduler, x, t, cond)
        else:
            target = run.eps(scheduler, x, t, cond, teacher=True)
            if not window:
                probs = run.parallel()
                state.use_weights(probs)
            eps = run.eps(scheduler, x, t, cond)
            window.append(run.lambdas[k] * F.mse_loss(eps, target) + run.beta * probs[k].sum())
            if len(window) == config.credit_steps or k == last:
                updates, window = run.update(torch.stack(window).sum(), updates), []
            eps = eps.detach()
        x = scheduler.step(eps, t, x, **extra, return_dict=False)[0].detach()
        if updates >= config.iterations:
            break
    return updates


def _image_update(run: _Run, updates: int) -> int:
    """One update on the final image's own error (objective `image`): a batch sampled uncached (the target) and
    with the plan the router values give at the target speedup, exactly as inference runs it, the error taken back
    through every step and cache entry to the values (straight-through: d out / d r = fresh - cached).

    A value is pushed by its error gradient plus beta times its branch's cost, beta being the benefit per cost at
    the plan's edge (the gradients averaged over the ranks): the entries that help most per MAC rise, the rest
    fall, and the plan stays at the target whatever the values' scale. With a forecast, the same error trains the
    weights of its terms at every reused entry (`Router.forecast_weights`). Memory: T student passes in the
    graph."""
    config, state, world, weights = run.config, run.state, run.world, run.router.forecast_weights
    noise, cond, _ = run.batch()
    target = run.sample(noise, cond, teacher=True)
    probs = run.parallel()
    run.threshold = closest_threshold(probs.detach(), run.speedup_at, config.target_speedup, config.tau)
    compute = (probs.detach() > run.threshold).float()
    compute[0] = 1.0
    state.use_weights(compute + probs - probs.detach())
    error = F.mse_loss(run.sample(noise, cond), target)
    gradient, *weights_gradient = torch.autograd.grad(error, [probs] + ([] if weights is None else [weights]))
    gradient = world.mean(gradient)[1:]
    cost = run.branch_costs.to(gradient)
    edge = int(compute[1:].sum().item())
    benefit = (-gradient / cost).flatten().sort(descending=True).values
    run.beta = benefit[edge - 1].item() if edge else benefit[0].item()
    push = ((gradient + run.beta * cost) * probs[1:]).sum()
    if weights is not None:  # their gradient as it is: the error is all they answer to
        push = push + (world.mean(weights_gradient[0]) * weights).sum()
    return run.update(push, updates, reported=error)


def _l2c_update(run: _Run, updates: int) -> int:
    """One L2C update (ALGORITHM.md §5): from noised real data, fill the cache with a full step k - 1,
    then match the teacher at step k. Only the router-decided (even, 1-based) steps are trained."""
    config, state, generator = run.config, run.state, run.generator
    _, cond, clean = run.batch()
    k = 2 * int(torch.randint(1, config.steps // 2 + 1, (1,), generator=generator)) - 1
    k = min(k, config.steps - 1)
    scheduler = run.scheduler()
    noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
    t_prev, t = scheduler.timesteps[k - 1], scheduler.timesteps[k]
    state.restart(at_step=k - 1)  # a full step k - 1 fills the cache
    probs = run.parallel()
    weights = torch.ones_like(probs).index_copy(0, torch.tensor([k], device=probs.device), probs[k : k + 1])
    state.use_weights(weights)
    with torch.no_grad():
        run.eps(scheduler, scheduler.add_noise(clean, noise, t_prev[None]), t_prev, cond)
    x = scheduler.add_noise(clean, noise, t[None])
    target = run.eps(scheduler, x, t, cond, teacher=True)
    return run.update(F.mse_loss(run.eps(scheduler, x, t, cond), target) + run.beta * probs[k].sum(), updates)


def _save(path: Path, run: _Run, updates: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = run.router.forecast_weights
    state = _Checkpoint(
        run.router.logits.detach().cpu().clone(), run.optimizer.state_dict(), updates, list(run.lambdas),
        run.next_refresh, run.generator.get_state(), asdict(run.config), run.beta,
        None if weights is None else weights.detach().cpu().clone(),
    )  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save(asdict(state), tmp)
    tmp.replace(path)  # atomic: a crash never leaves a torn checkpoint


def default_data(model: Model, objective: str) -> TrainData:
    """Training data a model brings along: for L2C on digits, the digits train split itself."""
    if objective == "l2c" and model.name == "digits":
        from .digits.data import digits_split

        images, labels, _, _ = digits_split()
        return TrainData(samples=images, labels=labels)
    return TrainData()


def router_quality(
    model: Model, router: Router, method: str, threshold: float, config: TrainConfig, samples: int, data: TrainData
) -> tuple[CachePlan, dict[str, Any]]:
    """The router's plan at `threshold` under `method`, and its quality against uncached generation on a fixed
    evaluation set of `samples` at the steps, sampler and guidance of `config` (`quality.plan_quality`)."""
    from .cache.methods import make_plan
    from .quality import evaluation_request, plan_quality
    from .sampling import generate

    plan = make_plan(method, config.steps, model.branch_layout, router, threshold=threshold, forecast=config.forecast)
    request = evaluation_request(
        model, samples, config.steps, config.scheduler, config.guidance,
        captions=data.captions, prompt_embeddings=data.prompt_embeddings,
    )  # fmt: skip
    return plan, plan_quality(model, plan, request, generate(model, request))


def train_and_save(
    model: Model,
    config: TrainConfig,
    out: Path,
    data: TrainData | None = None,
    eval_samples: int = 100,
    on_progress: ProgressCallback | None = None,
    checkpoint: Path | None = None,
    world: World = ALONE,
) -> dict[str, Any] | None:
    """Train, measure the router's plan against uncached generation, and write the router file.

    The file's metadata records the full training config, its duration and the measured quality. Among several
    processes, rank 0 measures and writes; the others return None.
    """
    data = data or default_data(model, config.objective)
    start = time.perf_counter()
    router = train_router(model, config, data, on_progress, checkpoint, world)
    seconds = time.perf_counter() - start
    if not world.main:
        return None
    method = plan_method(config.objective)
    threshold = threshold_for(model, router, config)
    plan, quality = router_quality(model, router, method, threshold, config, eval_samples, data)
    metadata = RouterMetadata(
        target=model.router_target(config.scheduler, config.steps),
        method=method,
        threshold=threshold,
        model_name=model.name,
        training=asdict(config) | {"seconds": round(seconds, 2), "processes": world.size},
        quality=quality,
        plan=[list(row) for row in plan.compute],
    )
    save_router(out, router, metadata)
    return quality
