"""One generation call for every caller (CLI, workers, benchmarks): model + plan + request -> images + stats.

The denoising loop mirrors diffusers' `DiTPipeline` and `PixArtAlpha/SigmaPipeline` numerically (same
noise, CFG batch layout, guidance, learned-sigma split, scheduler step and decode), so a compute-all
plan reproduces the pipelines exactly; it adds the cache, a per-step callback and timings.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .cache import CacheConfig, apply_branch_cache, remove_branch_cache
from .models import Model
from .schedules import CachePlan, none_plan

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


@dataclass
class Conditioning:
    """Transformer keyword inputs for the whole batch the transformer sees (CFG-doubled when `cfg`)."""

    kwargs: dict[str, Any]
    images: int
    cfg: bool
    uncond_first: bool
    text_len: int
    captions: list[str]


def build_conditioning(model: Model, request: GenerationRequest) -> Conditioning:
    """The CFG batch exactly as the family's diffusers pipeline builds it."""
    device, cfg = model.device, request.guidance > 1
    if model.family == "dit":
        if not request.class_labels:
            raise ValueError(f"{model.name} is class-conditional: give class labels")
        bad = [y for y in request.class_labels if not 0 <= y < model.num_classes]
        if bad:
            raise ValueError(f"class labels must be in [0, {model.num_classes - 1}] for {model.name}; got {bad}")
        labels = [y for y in request.class_labels for _ in range(request.num_images_per_prompt)]
        y = torch.tensor(labels, device=device)
        if cfg:  # [cond; uncond]; the null class is the last embedding row
            y = torch.cat([y, torch.full_like(y, model.num_classes)])
        captions = [model.labels.get(v, str(v)) for v in labels]
        return Conditioning({"class_labels": y}, len(labels), cfg, False, 0, captions)
    if model.pipeline is None:
        raise ValueError(f"{model.name} has no pipeline to encode prompts with")
    pe = request.prompt_embeddings
    if pe is None and not request.prompts:
        raise ValueError(f"{model.name} is text-to-image: give prompts")
    if pe is None and model.pipeline.text_encoder is None:
        raise ValueError(f"{model.name} has no text encoder: give precomputed prompt embeddings")
    embeds, mask, neg, neg_mask = model.pipeline.encode_prompt(
        request.prompts if pe is None else None,
        do_classifier_free_guidance=cfg,
        negative_prompt="" if pe is None else None,
        num_images_per_prompt=request.num_images_per_prompt,
        device=device,
        prompt_embeds=None if pe is None else pe.embeds.to(device),
        prompt_attention_mask=None if pe is None else pe.mask.to(device),
        negative_prompt_embeds=None if pe is None or pe.negative_embeds is None else pe.negative_embeds.to(device),
        negative_prompt_attention_mask=None if pe is None or pe.negative_mask is None else pe.negative_mask.to(device),
        clean_caption=False,
        max_sequence_length=model.max_sequence_length,
    )
    images = embeds.shape[0]
    if cfg:  # [uncond; cond]
        embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
    height, width = model.check_size(request.height, request.width)
    added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if model.transformer.config.sample_size == 128:
        resolution = torch.tensor([height, width]).repeat(images, 1).to(embeds.dtype).to(device)
        aspect = torch.tensor([float(height / width)]).repeat(images, 1).to(embeds.dtype).to(device)
        if cfg:
            resolution, aspect = torch.cat([resolution, resolution]), torch.cat([aspect, aspect])
        added = {"resolution": resolution, "aspect_ratio": aspect}
    captions = (
        [p for p in request.prompts for _ in range(request.num_images_per_prompt)]
        if request.prompts
        else [f"embedding {i}" for i in range(images)]
    )
    kwargs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": added}
    return Conditioning(kwargs, images, cfg, True, embeds.shape[1], captions)


def predict_noise(
    model: Model, scheduler: Any, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float
) -> torch.Tensor:
    """One transformer call on the CFG batch, guided, learned sigma dropped: the eps for `x` [B, C, H, W]."""
    batch = torch.cat([x, x]) if cond.cfg else x
    batch = scheduler.scale_model_input(batch, t)
    timestep = t[None].to(x.device).expand(batch.shape[0])
    out = model.transformer(batch, timestep=timestep, return_dict=False, **cond.kwargs)[0]
    if cond.cfg:
        first, second = out.chunk(2)
        uncond, guided = (first, second) if cond.uncond_first else (second, first)
        out = uncond + guidance * (guided - uncond)
    if model.transformer.config.out_channels // 2 == model.latent_channels:  # learned sigma
        out = out[:, : model.latent_channels]
    return out


def initial_noise(model: Model, scheduler: Any, images: int, height: int, width: int, seed: int) -> torch.Tensor:
    shape = model.latent_shape(images, height, width)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    return noise * scheduler.init_noise_sigma


def decode(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """Latents (or pixels) to images in [0, 1], as the pipelines do."""
    if model.vae is not None:
        scale = model.vae.config.scaling_factor
        # DiTPipeline multiplies by 1/s, PixArt divides by s: the rounding differs, so mirror each
        latents = 1 / scale * latents if model.family == "dit" else latents / scale
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
) -> GenerationResult:
    """Sample with the branch cache following `plan` (None = compute everything)."""
    if request.steps < 1:
        raise ValueError("steps must be >= 1")
    height, width = model.check_size(request.height, request.width)
    branches = len(model.branch_layout)
    plan = plan or none_plan(request.steps, branches)
    if (plan.steps, plan.branches) != (request.steps, branches):
        raise ValueError(
            f"the plan is {plan.steps} steps x {plan.branches} branches but this run needs {request.steps} x {branches}"
        )
    cond = build_conditioning(model, request)
    scheduler = model.make_scheduler(request.scheduler, request.steps)
    latents = initial_noise(model, scheduler, cond.images, height, width, request.seed)
    extra = step_kwargs(scheduler, request.seed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    state = apply_branch_cache(model.transformer, CacheConfig(plan=plan))
    step_seconds: list[float] = []
    try:
        sync()
        start = last = time.perf_counter()
        for k, t in enumerate(scheduler.timesteps):
            eps = predict_noise(model, scheduler, latents, t, cond, request.guidance)
            latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
            now = time.perf_counter()  # host time: no per-step sync, so the GPU queue stays full
            step_seconds.append(now - last)
            last = now
            if on_step is not None:
                on_step(k + 1, request.steps)
        images = decode(model, latents).float().cpu()
        sync()
        total = time.perf_counter() - start
    finally:
        remove_branch_cache(model.transformer)

    profile = model.mac_profile(height, width, cond.text_len)
    speedup = profile.generation_macs(None, request.steps, cond.cfg) / profile.generation_macs(
        plan.reused, request.steps, cond.cfg
    )
    stats = GenerationStats(
        steps=request.steps,
        computed=state.computed,
        reused=state.reused,
        cache_usage_rate=state.reused / (state.reused + state.computed),
        theoretical_speedup=speedup,
        step_seconds=step_seconds,
        total_seconds=total,
    )
    return GenerationResult(images, stats, cond.captions)
