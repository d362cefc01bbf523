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


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (the FID formula)."""
    mu1, mu2 = features.mean(0), reference.mean(0)
    s1, s2 = np.cov(features, rowvar=False), np.cov(reference, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))
