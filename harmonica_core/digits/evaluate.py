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
    frechet: float  # classifier-feature Frechet distance to the held-out real digits
    samples: int


@torch.no_grad()
def score_digits(images: torch.Tensor, labels: list[int]) -> DigitsScore:
    """images [B, 1, 8, 8] in [0, 1] (as generated) with the class each was asked for."""
    classifier = load_classifier()
    x = images.float().cpu() * 2 - 1
    accuracy = (classifier(x).argmax(1) == torch.tensor(labels)).float().mean().item()
    _, _, real, _ = digits_split()
    frechet = frechet_distance(classifier.embed(x).numpy(), classifier.embed(real).numpy())
    return DigitsScore(accuracy, frechet, len(labels))
