"""Score digits generations: classifier accuracy on the asked-for class and Frechet distance to real digits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..measures import frechet_distance
from .classifier import load_classifier
from .data import digits_split


@dataclass
class DigitsScore:
    accuracy: float  # share of samples classified as the class asked for
    frechet: float  # realism: classifier-feature Frechet distance to the held-out real digits
    samples: int
    fidelity: float | None = None  # the same distance to the uncached samples of the model (when given)


@torch.no_grad()
def score_digits(images: torch.Tensor, labels: list[int], uncached: torch.Tensor | None = None) -> DigitsScore:
    """images [B, 1, 8, 8] in [0, 1] (as generated) with the class each was asked for; `uncached`: the model's
    uncached samples, for fidelity. Realism rewards drift towards prototypical digits (a cached run can score below
    the uncached model); fidelity measures the distance from what the model makes without a cache."""
    classifier = load_classifier()
    x = images.float().cpu() * 2 - 1
    accuracy = (classifier(x).argmax(1) == torch.tensor(labels)).float().mean().item()
    _, _, real, _ = digits_split()
    features = classifier.embed(x).numpy()
    frechet = frechet_distance(features, classifier.embed(real).numpy())
    fidelity = None
    if uncached is not None:
        fidelity = frechet_distance(features, classifier.embed(uncached.float().cpu() * 2 - 1).numpy())
    return DigitsScore(accuracy, frechet, len(labels), fidelity)
