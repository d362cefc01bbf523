"""How close a cached generation stays to the uncached one from the same noise (ALGORITHM.md §6)."""

from __future__ import annotations

from typing import Any

from .cache.plan import CachePlan
from .measures import mse, psnr, psnr_interval
from .models import Model
from .sampling import GenerationRequest, GenerationResult, PromptEmbeddings, generate


def evaluation_request(
    model: Model,
    samples: int,
    steps: int,
    scheduler: str,
    guidance: float,
    seed: int = 1234,
    captions: tuple[str, ...] = (),
    prompt_embeddings: PromptEmbeddings | None = None,
) -> GenerationRequest:
    """A fixed request: classes (or captions / embedding rows) in turn, a fixed seed."""
    conditions = model.spec.evaluation_conditions(model, samples, captions, prompt_embeddings)
    return GenerationRequest(steps=steps, scheduler=scheduler, guidance=guidance, seed=seed, **conditions)


def plan_quality(
    model: Model, plan: CachePlan, request: GenerationRequest, reference: GenerationResult
) -> dict[str, Any]:
    """Cache usage, theoretical speedup, and image error against `reference` (same request, no cache): MSE and PSNR
    with PSNR's bootstrap 95 % interval over the samples; on digits also accuracy and the Frechet distances to real
    digits (realism) and to the uncached samples (fidelity)."""
    result = generate(model, request, plan)
    quality: dict[str, Any] = {
        "cache_usage_rate": result.stats.cache_usage_rate,
        "theoretical_speedup": result.stats.theoretical_speedup,
        "mse": mse(result.images, reference.images),
        "psnr": psnr(result.images, reference.images),
        "psnr_ci95": list(psnr_interval(result.images, reference.images)),
        "samples": result.images.shape[0],
        "latency_s": result.stats.total_seconds,
    }
    if model.name == "digits":
        from .digits.evaluate import score_digits

        score = score_digits(result.images, request.class_labels, uncached=reference.images)
        quality |= {"accuracy": score.accuracy, "frechet": score.frechet, "frechet_fidelity": score.fidelity}
    return quality
