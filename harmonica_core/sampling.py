"""One generation call for every caller (CLI, workers, benchmarks): model + plan + request -> images + stats.

The denoising loop mirrors diffusers' `DiTPipeline` and `PixArtAlpha/SigmaPipeline` numerically (same
noise, CFG batch layout, guidance, learned-sigma split, scheduler step and decode), so a compute-all
plan reproduces the pipelines exactly; it adds the cache, a per-step callback and timings.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .cache.methods import none_plan
from .cache.plan import CachePlan
from .execution import DEFAULT_MODE, Forward, transformer_forward
from .families import Conditioning
from .models import Model

StepCallback = Callable[[int, int], None]  # (steps done, total); raise GenerationCancelled to stop


class GenerationCancelled(RuntimeError):
    """Raised by a step callback to stop a generation between denoising steps."""


@dataclass
class PromptEmbeddings:
    """Precomputed PixArt text embeddings (T5 outputs), for callers without a text encoder."""

    embeds: torch.Tensor  # [B, L, C]
    mask: torch.Tensor  # [B, L]
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    def select(self, rows: list[int] | torch.Tensor) -> PromptEmbeddings:
        """The embeddings of the given rows (a batch drawn from a pool)."""
        negative = None if self.negative_embeds is None else self.negative_embeds[rows]
        negative_mask = None if self.negative_mask is None else self.negative_mask[rows]
        return PromptEmbeddings(self.embeds[rows], self.mask[rows], negative, negative_mask)


@dataclass
class GenerationRequest:
    """What to generate. DiT models take `class_labels`; PixArt takes `prompts` or `prompt_embeddings`."""

    class_labels: list[int] | None = None
    prompts: list[str] | None = None
    prompt_embeddings: PromptEmbeddings | None = None
    num_images_per_prompt: int = 1
    steps: int = 20
    scheduler: str = "ddim"
    guidance: float = 1.5
    seed: int = 0
    height: int | None = None
    width: int | None = None

    @classmethod
    def from_request(cls, req: Mapping[str, Any]) -> GenerationRequest:
        """From a validated request (`validation.validate_generation`: the API's field names)."""
        return cls(
            class_labels=req["class_labels"], prompts=req["prompts"], num_images_per_prompt=req["num_images"],
            steps=req["steps"], scheduler=req["scheduler"], guidance=req["guidance"], seed=req["seed"],
            height=req["height"], width=req["width"],
        )  # fmt: skip


@dataclass
class GenerationStats:
    """What a generation cost and how much it reused (ALGORITHM.md §6)."""

    steps: int
    computed: int
    reused: int
    cache_usage_rate: float
    theoretical_speedup: float
    step_seconds: list[float]
    total_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "computed_branches": self.computed,
            "reused_branches": self.reused,
            "cache_usage_rate": self.cache_usage_rate,
            "theoretical_speedup": self.theoretical_speedup,
            "latency_s": self.total_seconds,
            "step_seconds": self.step_seconds,
        }


@dataclass
class GenerationResult:
    images: torch.Tensor  # [B, C, H, W] in [0, 1], float32 on CPU
    stats: GenerationStats
    labels: list[str] = field(default_factory=list)  # one caption per image (class id or prompt)


def predict_noise(
    model: Model,
    scheduler: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance: float,
    forward: tuple[Forward, int] | None = None,
) -> torch.Tensor:
    """One transformer call on the CFG batch, guided, learned sigma dropped: the eps for `x` [B, C, H, W].

    `forward`: an execution mode's forward and the step index it is at; None calls the transformer as is.
    """
    batch = torch.cat([x, x]) if cond.cfg else x
    batch = scheduler.scale_model_input(batch, t)
    timestep = t[None].to(x.device).expand(batch.shape[0])
    if forward is None:
        out = model.transformer(batch, timestep=timestep, return_dict=False, **cond.kwargs)[0]
    else:
        run, k = forward
        out = run(batch, timestep, k)
    return model.spec.guide(model, out, cond, guidance)


def initial_noise(model: Model, scheduler: Any, images: int, height: int, width: int, seed: int) -> torch.Tensor:
    shape = model.latent_shape(images, height, width)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    return noise * scheduler.init_noise_sigma


def decode(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """Latents (or pixels) to images in [0, 1], as the pipelines do."""
    if model.vae is not None:
        latents = model.spec.unscale_latents(latents, model.vae.config.scaling_factor)  # each pipeline's rounding
        latents = model.vae.decode(latents, return_dict=False)[0]
    return (latents / 2 + 0.5).clamp(0, 1)


def step_kwargs(scheduler: Any, seed: int) -> dict[str, Any]:
    """Scheduler extras the pipelines pass (a generator for stochastic samplers)."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator(device="cpu").manual_seed(seed + 1)}
    return {}


@torch.no_grad()
def generate(
    model: Model,
    request: GenerationRequest,
    plan: CachePlan | None = None,
    on_step: StepCallback | None = None,
    mode: str = DEFAULT_MODE,
) -> GenerationResult:
    """Sample with the branch cache following `plan` (None = compute everything), in execution `mode`
    (`execution.MODES`: all give the same images within float tolerance)."""
    if request.steps < 1:
        raise ValueError("steps must be >= 1")
    height, width = model.check_size(request.height, request.width)
    branches = len(model.branch_layout)
    plan = plan or none_plan(request.steps, branches)
    if (plan.steps, plan.branches) != (request.steps, branches):
        raise ValueError(
            f"the plan is {plan.steps} steps x {plan.branches} branches but this run needs {request.steps} x {branches}"
        )
    cond = model.spec.conditioning(model, request)
    scheduler = model.make_scheduler(request.scheduler, request.steps)
    latents = initial_noise(model, scheduler, cond.images, height, width, request.seed)
    extra = step_kwargs(scheduler, request.seed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    step_seconds: list[float] = []
    sync()
    start = last = time.perf_counter()  # precomputing the modulations is part of the generation's time
    with transformer_forward(model, plan, cond, scheduler.timesteps, mode) as forward:
        for k, t in enumerate(scheduler.timesteps):
            eps = predict_noise(model, scheduler, latents, t, cond, request.guidance, (forward, k))
            latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
            now = time.perf_counter()  # host time: no per-step sync, so the GPU queue stays full
            step_seconds.append(now - last)
            last = now
            if on_step is not None:
                on_step(k + 1, request.steps)
        images = decode(model, latents).float().cpu()
        sync()
        total = time.perf_counter() - start

    profile = model.mac_profile(height, width, cond.text_len)
    speedup = profile.generation_macs(None, request.steps, cond.cfg) / profile.generation_macs(
        plan.reused, request.steps, cond.cfg
    )
    stats = GenerationStats(
        steps=request.steps,
        computed=forward.computed,
        reused=forward.reused,
        cache_usage_rate=forward.reused / (forward.reused + forward.computed),
        theoretical_speedup=speedup,
        step_seconds=step_seconds,
        total_seconds=total,
    )
    return GenerationResult(images, stats, cond.captions)
