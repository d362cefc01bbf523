"""The quality measures on inputs whose answers are known: PSNR's bootstrap interval and the fidelity Frechet."""

from __future__ import annotations

import math

import torch

from harmonica_core.digits.evaluate import score_digits
from harmonica_core.measures import psnr, psnr_interval


def test_equal_errors_give_an_interval_of_one_point():
    reference = torch.zeros(50, 1, 8, 8)
    images = reference + 0.1  # every sample's MSE is 0.01: 20 dB, whatever is resampled
    low, high = psnr_interval(images, reference)
    assert low == high and math.isclose(low, 20.0, abs_tol=1e-6)  # 0.1 in float32 is not exactly 0.1


def test_the_interval_holds_the_estimate_and_narrows_with_more_samples():
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(2000, 1, 1, 1, generator=generator) * 0.2  # per-sample error levels differ
    images = scale * torch.randn(2000, 1, 8, 8, generator=generator)
    reference = torch.zeros_like(images)
    low, high = psnr_interval(images, reference)
    assert low < psnr(images, reference) < high
    few_low, few_high = psnr_interval(images[:100], reference[:100])
    assert few_high - few_low > 3 * (high - low)  # about sqrt(20) wider with 20x fewer samples
    assert psnr_interval(images, reference) == (low, high)  # deterministic


def test_fidelity_is_zero_against_itself_and_grows_with_drift():
    generator = torch.Generator().manual_seed(1)
    labels = [i % 10 for i in range(200)]
    uncached = torch.rand(200, 1, 8, 8, generator=generator)
    same = score_digits(uncached, labels, uncached=uncached)
    assert abs(same.fidelity) < 1e-6
    drifted = (uncached + 0.3 * torch.rand(200, 1, 8, 8, generator=generator)).clamp(0, 1)
    assert score_digits(drifted, labels, uncached=uncached).fidelity > 1e-3
    assert score_digits(uncached, labels).fidelity is None  # no uncached set given
