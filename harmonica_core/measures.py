"""Quality measures shared by benchmarks and router training (ALGORITHM.md §6)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg


def mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error between images in [0, 1] generated from the same noise."""
    return torch.mean((images.float() - reference.float()) ** 2).item()


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (inf when identical)."""
    error = mse(images, reference)
    return math.inf if error == 0 else 10 * math.log10(1.0 / error)


def psnr_interval(
    images: torch.Tensor, reference: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap confidence interval of `psnr` over the samples (percentile method): the samples are resampled
    with replacement, so two methods measured on the same noise are told apart only where their intervals do not
    overlap. Deterministic given `seed`."""
    errors = ((images.double() - reference.double()) ** 2).flatten(1).mean(1)  # per sample
    rows = torch.randint(len(errors), (resamples, len(errors)), generator=torch.Generator().manual_seed(seed))
    means = errors[rows].mean(1)
    if not means.gt(0).any():  # identical images: PSNR is infinite in every resample
        return math.inf, math.inf
    psnrs = 10 * torch.log10(1 / means)  # a resample of only identical images is inf
    low, high = torch.quantile(psnrs, torch.tensor([(1 - level) / 2, (1 + level) / 2]).double())
    return low.item(), high.item()


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (the FID formula)."""
    mu1, mu2 = features.mean(0), reference.mean(0)
    s1, s2 = np.cov(features, rowvar=False), np.cov(reference, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))
