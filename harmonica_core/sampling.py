"""One generation call for every caller (CLI, workers, benchmarks): model + plan + request -> images + stats.

The denoising loop mirrors diffusers' `DiTPipeline` and `PixArtAlpha/SigmaPipeline` numerically (same
noise, CFG batch layout, guidance, learned-sigma split, scheduler step and decode), so a compute-all
plan reproduces the pipelines exactly; it adds the cache, a per-step callback and timings.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .cache.methods import none_plan
from .cache.plan import CachePlan
from .execution import DEFAULT_MODE, Forward, resolve_mode, transformer_forward
from .families import Conditioning
from .graphs import GraphedForward
from .models import Model
from .validation import BATCH_FIELDS


@dataclass
class StepReport:
    """One finished denoising step, as a progress callback sees it."""

    step: int  # steps done
    total: int
    seconds: float  # host time of the step (no device sync: on a GPU, when it was queued)
    computed: int  # branches this step computed ...
    reused: int  # ... and reused

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total": self.total,
            "step_seconds": self.seconds,
            "computed_branches": self.computed,
            "reused_branches": self.reused,
        }


StepCallback = Callable[[StepReport], None]  # raise GenerationCancelled to stop


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

    def repeat_each(self, copies: int) -> PromptEmbeddings:
        """Each row `copies` times in place, as the pipelines repeat a prompt for several images."""
        return self.select(torch.arange(len(self.embeds)).repeat_interleave(copies))

    @staticmethod
    def concat(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        """The rows of every part, in order; negatives only where every part has them."""

        def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(v is None for v in values) else torch.cat(values)

        return PromptEmbeddings(
            torch.cat([p.embeds for p in parts]),
            torch.cat([p.mask for p in parts]),
            cat([p.negative_embeds for p in parts]),
            cat([p.negative_mask for p in parts]),
        )


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
    mode: str  # the execution mode it ran in (`execution.resolve_mode`)

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "computed_branches": self.computed,
            "reused_branches": self.reused,
            "cache_usage_rate": self.cache_usage_rate,
            "theoretical_speedup": self.theoretical_speedup,
            "latency_s": self.total_seconds,
            "step_seconds": self.step_seconds,
            "execution_mode": self.mode,
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
    guidance: float | torch.Tensor,
    forward: tuple[Forward, int] | None = None,
) -> torch.Tensor:
    """One transformer call on the CFG batch, guided, learned sigma dropped: the eps for `x` [B, C, H, W].

    `forward`: an execution mode's forward and the step index it is at (it holds the timesteps on the device, so
    the step copies nothing from the host and never waits for the GPU); None calls the transformer as is.
    """
    batch = torch.cat([x, x]) if cond.cfg else x
    batch = scheduler.scale_model_input(batch, t)
    if forward is None:
        timestep = t[None].to(x.device).expand(batch.shape[0])
        out = model.transformer(batch, timestep=timestep, return_dict=False, **cond.kwargs)[0]
    else:
        run, k = forward
        out = run(batch, k)
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


def images_of(request: GenerationRequest) -> int:
    """How many images a request makes: one per class label, prompt or embedding row, times `num_images_per_prompt`."""
    if request.prompt_embeddings is not None and not request.prompts:
        return len(request.prompt_embeddings.embeds) * request.num_images_per_prompt
    return len(request.class_labels or request.prompts or []) * request.num_images_per_prompt


def merge_requests(requests: list[GenerationRequest]) -> GenerationRequest:
    """One request for every image of `requests`, in order, one image per condition: the batch the family builds
    for it holds each request's rows as that request alone would have them."""
    first = requests[0]
    for name in BATCH_FIELDS:
        values = {getattr(r, name) for r in requests}
        if len(values) > 1:
            raise ValueError(f"requests that differ in {name} ({sorted(values, key=str)}) cannot share a batch")
    if len({(r.class_labels is None, r.prompts is None, r.prompt_embeddings is None) for r in requests}) > 1:
        raise ValueError("requests with class labels, prompts and prompt embeddings cannot share a batch")

    def each(values: list[Any] | None, copies: int) -> list[Any]:
        return [v for v in values or [] for _ in range(copies)]

    labels = [y for r in requests for y in each(r.class_labels, r.num_images_per_prompt)]
    prompts = [p for r in requests for p in each(r.prompts, r.num_images_per_prompt)]
    embeddings = None
    if first.prompt_embeddings is not None:
        parts = [r.prompt_embeddings.repeat_each(r.num_images_per_prompt) for r in requests]
        embeddings = PromptEmbeddings.concat(parts)
    merged = {"class_labels": labels or None, "prompts": prompts or None, "prompt_embeddings": embeddings}
    return replace(first, **merged, num_images_per_prompt=1)


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
    return generate_batch(model, [request], plan, on_step, mode)[0]


@torch.no_grad()
def generate_batch(
    model: Model,
    requests: list[GenerationRequest],
    plan: CachePlan | None = None,
    on_step: StepCallback | None = None,
    mode: str = DEFAULT_MODE,
) -> list[GenerationResult]:
    """`generate` for several compatible requests (equal `BATCH_FIELDS`) as one denoising batch, which shares
    every step's transformer call and cache decision: each request keeps its own seed and initial noise, so its
    images equal those it gets alone within float tolerance (the samplers offered are deterministic after the
    initial noise). The stats (counts, timings) are the batch's, the same in every result."""
    request = merge_requests(requests)
    if request.steps < 1:
        raise ValueError("steps must be >= 1")
    height, width = model.check_size(request.height, request.width)
    branches = len(model.branch_layout)
    plan = plan or none_plan(request.steps, branches)
    if (plan.steps, plan.branches) != (request.steps, branches):
        raise ValueError(
            f"the plan is {plan.steps} steps x {plan.branches} branches but this run needs {request.steps} x {branches}"
        )
    mode = resolve_mode(model, mode, plan)
    cond = model.spec.conditioning(model, request)
    scheduler = model.make_scheduler(request.scheduler, request.steps)
    counts = [images_of(r) for r in requests]
    if sum(counts) != cond.images:
        raise ValueError(f"the requests ask for {counts} images but the conditioning holds {cond.images}")
    noise = [initial_noise(model, scheduler, n, height, width, r.seed) for n, r in zip(counts, requests, strict=True)]
    latents = torch.cat(noise)
    extra = step_kwargs(scheduler, request.seed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def denoise(scheduler: Any, x: torch.Tensor, k: int, run: Forward, guidance: float | torch.Tensor) -> torch.Tensor:
        t = scheduler.timesteps[k]
        eps = predict_noise(model, scheduler, x, t, cond, guidance, (run, k))
        return scheduler.step(eps, t, x, **extra, return_dict=False)[0]

    step_seconds: list[float] = []
    sync()
    start = last = time.perf_counter()  # precomputing the modulations is part of the generation's time
    with transformer_forward(model, plan, cond, scheduler.timesteps, mode) as forward:
        graphed = isinstance(forward, GraphedForward)
        replay = forward.capture_steps(denoise, scheduler, latents, request.guidance) if graphed else None
        counted = (0, 0)
        for k in range(request.steps):
            latents = replay(k) if replay else denoise(scheduler, latents, k, forward, request.guidance)
            now = time.perf_counter()  # host time: no per-step sync, so the GPU queue stays full
            step_seconds.append(now - last)
            last = now
            if on_step is not None:
                computed, reused = forward.computed - counted[0], forward.reused - counted[1]
                on_step(StepReport(k + 1, request.steps, step_seconds[-1], computed, reused))
            counted = (forward.computed, forward.reused)
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
        mode=mode,
    )
    bounds = list(itertools.accumulate(counts, initial=0))
    return [GenerationResult(images[a:b], stats, cond.captions[a:b]) for a, b in itertools.pairwise(bounds)]
