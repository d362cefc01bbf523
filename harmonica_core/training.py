"""Router training: Step-Wise Denoising Training with the IEPO or LTC objective, and the data-based
Learning-to-Cache baseline (ALGORITHM.md §3-5).

One call, `train_router`, serves the CLI and the service: it reports progress through a callback (raise
`TrainingCancelled` there to stop between updates), writes a checkpoint at every trajectory boundary and
resumes from it with the same result as an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache import CacheConfig, CacheState, apply_branch_cache, remove_branch_cache
from .models import Model
from .router import Router, RouterMetadata, save_router
from .sampling import Conditioning, GenerationRequest, PromptEmbeddings, build_conditioning, predict_noise, step_kwargs
from .validation import validate_training

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


def plan_method(objective: str) -> str:
    """The inference method a router trained with `objective` runs under (L2C alternates full steps)."""
    return "l2c" if objective == "l2c" else "harmonica"


class TrainingCancelled(RuntimeError):
    """Raised by a progress callback to stop training between router updates."""


@dataclass
class TrainConfig:
    """Router training settings; stored in the router file's metadata.

    `iterations` counts router updates (T - 1 per SDT trajectory). `beta` weighs the sum of router
    values per step (pushes towards reuse); its scale depends on N and on the scale of lambda.
    """

    objective: str = "iepo"
    steps: int = 20
    scheduler: str = "ddim"
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.01
    beta: float = 7e-8
    tau: float = 0.1
    lambda_every: int = 100
    lambda_mode: str = "cumulative"
    guidance: float = 1.5
    seed: int = 0
    frozen: bool = True  # False: the released code's cost (weights take gradients, teacher keeps a graph); benchmarks

    def validate(self) -> None:
        """The bounds every entry point applies (`validation.TRAINING_BOUNDS`); data is the caller's concern."""
        validate_training(asdict(self), None, data=True)


@dataclass
class TrainData:
    """Where conditions (and, for L2C, clean samples) come from; defaults suit the model's family."""

    captions: tuple[str, ...] = DEFAULT_CAPTIONS  # PixArt with a text encoder
    prompt_embeddings: PromptEmbeddings | None = None  # PixArt without one: rows are drawn per batch
    samples: torch.Tensor | None = None  # L2C: clean latents/pixels [M, C, H, W]
    labels: torch.Tensor | None = None  # L2C on DiT: their class labels [M]


@dataclass
class TrainProgress:
    iteration: int
    total: int
    loss: float
    cache_usage_rate: float  # at the training threshold tau
    lambdas: list[float] = field(default_factory=list)


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


def cache_usage_at(probs: torch.Tensor, tau: float) -> float:
    """Share of router entries at or below the threshold: the planned cache usage rate."""
    return (probs <= tau).float().mean().item()


class _Run:
    """The pieces one training run shares: model, cache state, scheduler timesteps, data."""

    def __init__(self, model: Model, config: TrainConfig, data: TrainData, state: CacheState) -> None:
        self.model, self.config, self.data, self.state = model, config, data, state
        self.latent = model.latent_shape(config.batch_size, *model.check_size(None, None))

    def scheduler(self) -> Any:
        """A fresh scheduler per trajectory: multistep solvers keep per-trajectory state."""
        return self.model.make_scheduler(self.config.scheduler, self.config.steps)

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning, torch.Tensor | None]:
        """Noise x_T, the CFG conditioning, and (L2C) clean samples, all drawn from `generator`."""
        b, model, data = self.config.batch_size, self.model, self.data
        noise = torch.randn(self.latent, generator=generator).to(model.device, model.dtype)
        clean = None
        request = GenerationRequest(steps=self.config.steps, guidance=self.config.guidance)
        if self.config.objective == "l2c":
            if data.samples is None:
                raise ValueError("the l2c objective trains from real data: give TrainData.samples")
            index = torch.randint(len(data.samples), (b,), generator=generator)
            clean = data.samples[index].to(model.device, model.dtype)
        if model.family == "dit":
            if clean is not None and data.labels is not None:
                request.class_labels = data.labels[index].tolist()
            else:
                request.class_labels = torch.randint(min(model.num_classes, 1000), (b,), generator=generator).tolist()
        elif data.prompt_embeddings is not None:
            rows = torch.randint(len(data.prompt_embeddings.embeds), (b,), generator=generator)
            request.prompt_embeddings = data.prompt_embeddings.select(rows)
        else:
            picks = torch.randint(len(data.captions), (b,), generator=generator).tolist()
            request.prompts = [data.captions[i] for i in picks]
        return noise, build_conditioning(model, request), clean

    def eps(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, teacher: bool = False):
        """Teacher: no cache read or write, no graph. Student: soft mix with the cache."""
        if not teacher:
            return predict_noise(self.model, scheduler, x, t, cond, self.config.guidance)
        self.state.bypass = True
        try:
            with torch.set_grad_enabled(not self.config.frozen):
                return predict_noise(self.model, scheduler, x, t, cond, self.config.guidance)
        finally:
            self.state.bypass = False

    @torch.no_grad()
    def final(self, noise: torch.Tensor, cond: Conditioning, weights: torch.Tensor) -> torch.Tensor:
        """x_0 (latents/pixels) of a full trajectory with fixed soft router values `weights` [T, N]."""
        self.state.reset()
        self.state.config.soft_weights = weights
        scheduler, x = self.scheduler(), noise
        extra = step_kwargs(scheduler, self.config.seed)
        for t in scheduler.timesteps:
            x = scheduler.step(self.eps(scheduler, x, t, cond), t, x, **extra, return_dict=False)[0]
        return x

    @torch.no_grad()
    def lambdas(self, noise: torch.Tensor, cond: Conditioning, probs: torch.Tensor) -> list[float]:
        """IEPO weights lambda_k (ALGORITHM.md §4); deterministic given the batch, no global RNG touched."""
        steps, ones = self.config.steps, torch.ones_like(probs)
        result = [0.0] * steps
        if self.config.lambda_mode == "cumulative":
            weights = ones.clone()
            previous = self.final(noise, cond, weights)
            for k in range(1, steps):
                weights[k] = probs[k]
                current = self.final(noise, cond, weights.clone())
                result[k] = F.mse_loss(current, previous).item()
                previous = current
        else:
            cached = self.final(noise, cond, probs)
            for k in range(1, steps):
                weights = probs.clone()
                weights[k] = 1.0
                result[k] = F.mse_loss(cached, self.final(noise, cond, weights)).item()
        return result


def train_router(
    model: Model,
    config: TrainConfig,
    data: TrainData | None = None,
    on_progress: ProgressCallback | None = None,
    checkpoint: Path | None = None,
) -> Router:
    """Train a router for `model` at `config.steps` steps of `config.scheduler`.

    With `checkpoint`, state is saved there at every trajectory boundary (and at the end) and a run
    finding a checkpoint of the same config resumes from it.
    """
    config.validate()
    data = data or TrainData()
    generator = torch.Generator().manual_seed(config.seed)
    router = Router(config.steps, len(model.branch_layout), generator=generator).to(model.device)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    updates, next_refresh = 0, 0
    lambdas = [1.0] * config.steps
    if checkpoint is not None and checkpoint.is_file():
        saved = _Checkpoint(**torch.load(checkpoint, weights_only=False))
        if saved.config != asdict(config):
            raise ValueError(f"checkpoint {checkpoint} was written for another training config; delete it or match it")
        with torch.no_grad():
            router.logits.copy_(saved.logits)
        optimizer.load_state_dict(saved.optimizer)
        updates, lambdas, next_refresh = saved.updates, saved.lambdas, saved.next_refresh
        generator.set_state(saved.generator)

    state = apply_branch_cache(
        model.transformer, CacheConfig(soft_weights=router().detach(), update_threshold=config.tau)
    )
    run = _Run(model, config, data, state)
    step = _l2c_update if config.objective == "l2c" else _sdt_trajectory
    model.transformer.requires_grad_(not config.frozen)
    try:
        while updates < config.iterations:
            if checkpoint is not None:
                _save(checkpoint, router, optimizer, updates, lambdas, next_refresh, generator, config)
            noise, cond, clean = run.batch(generator)
            if config.objective == "iepo" and updates >= next_refresh:
                lambdas = run.lambdas(noise, cond, router().detach())
                next_refresh = updates + config.lambda_every
            updates = step(run, router, optimizer, noise, cond, clean, lambdas, updates, on_progress, generator)
    finally:
        remove_branch_cache(model.transformer)
        model.transformer.requires_grad_(False)
        model.transformer.zero_grad(set_to_none=True)
    if checkpoint is not None:
        _save(checkpoint, router, optimizer, updates, lambdas, next_refresh, generator, config)
    return router


def _update(router: Router, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    router.clamp_()


def _report(on_progress, run: _Run, router: Router, updates: int, loss: float, lambdas: list[float]) -> None:
    if on_progress is not None:
        probs = router().detach()
        cur = cache_usage_at(probs, run.config.tau)
        on_progress(TrainProgress(updates, run.config.iterations, loss, cur, list(lambdas)))


def _sdt_trajectory(run, router, optimizer, noise, cond, _clean, lambdas, updates, on_progress, _generator) -> int:
    """One SDT trajectory (ALGORITHM.md §3): T - 1 router updates, the student driving x_t."""
    config, state = run.config, run.state
    state.reset()  # a new trajectory starts with an empty cache
    scheduler, x = run.scheduler(), noise
    extra = step_kwargs(scheduler, config.seed)
    for k, t in enumerate(scheduler.timesteps):
        if k == 0:  # full compute fills the cache; no loss
            state.config.soft_weights = router().detach()
            with torch.no_grad():
                eps = run.eps(scheduler, x, t, cond)
        else:
            target = run.eps(scheduler, x, t, cond, teacher=True)
            probs = router()
            state.config.soft_weights = probs
            eps = run.eps(scheduler, x, t, cond)
            loss = lambdas[k] * F.mse_loss(eps, target) + config.beta * probs[k].sum()
            _update(router, optimizer, loss)
            updates += 1
            _report(on_progress, run, router, updates, loss.item(), lambdas)
            eps = eps.detach()
        x = scheduler.step(eps, t, x, **extra, return_dict=False)[0].detach()
        if updates >= config.iterations:
            break
    return updates


def _l2c_update(run, router, optimizer, _noise, cond, clean, _lambdas, updates, on_progress, generator) -> int:
    """One L2C update (ALGORITHM.md §5): from noised real data, fill the cache with a full step k - 1,
    then match the teacher at step k. Only the router-decided (even, 1-based) steps are trained."""
    config, state = run.config, run.state
    k = 2 * int(torch.randint(1, config.steps // 2 + 1, (1,), generator=generator)) - 1
    k = min(k, config.steps - 1)
    scheduler = run.scheduler()
    noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
    t_prev, t = scheduler.timesteps[k - 1], scheduler.timesteps[k]
    state.reset()
    state.step = k - 2  # the next transformer call is step k - 1
    probs = router()
    weights = torch.ones_like(probs).index_copy(0, torch.tensor([k], device=probs.device), probs[k : k + 1])
    state.config.soft_weights = weights
    with torch.no_grad():
        run.eps(scheduler, scheduler.add_noise(clean, noise, t_prev[None]), t_prev, cond)
    x = scheduler.add_noise(clean, noise, t[None])
    target = run.eps(scheduler, x, t, cond, teacher=True)
    loss = F.mse_loss(run.eps(scheduler, x, t, cond), target) + config.beta * probs[k].sum()
    _update(router, optimizer, loss)
    _report(on_progress, run, router, updates + 1, loss.item(), [])
    return updates + 1


def _save(path: Path, router, optimizer, updates, lambdas, next_refresh, generator, config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _Checkpoint(
        router.logits.detach().cpu().clone(), optimizer.state_dict(), updates, list(lambdas), next_refresh,
        generator.get_state(), asdict(config),
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


def train_and_save(
    model: Model,
    config: TrainConfig,
    out: Path,
    data: TrainData | None = None,
    eval_samples: int = 100,
    on_progress: ProgressCallback | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Train, measure the router's plan against uncached generation, and write the router file.

    The file's metadata records the full training config, its duration and the measured quality.
    """
    from .quality import evaluation_request, plan_quality
    from .sampling import generate
    from .schedules import make_plan

    data = data or default_data(model, config.objective)
    start = time.perf_counter()
    router = train_router(model, config, data, on_progress, checkpoint)
    seconds = time.perf_counter() - start
    method = plan_method(config.objective)
    plan = make_plan(method, config.steps, len(model.branch_layout), router=router, threshold=config.tau)
    request = evaluation_request(
        model, eval_samples, config.steps, config.scheduler, config.guidance,
        captions=data.captions, prompt_embeddings=data.prompt_embeddings,
    )  # fmt: skip
    quality = plan_quality(model, plan, request, generate(model, request)) | {"method": method}
    metadata = RouterMetadata(
        target=model.router_target(config.scheduler, config.steps),
        threshold=config.tau,
        model_name=model.name,
        training=asdict(config) | {"seconds": round(seconds, 2)},
        quality=quality,
    )
    save_router(out, router, metadata)
    return quality
