"""The shipped digits model and classifier meet their quality floors."""

from __future__ import annotations

import json

import torch

from harmonica_core.digits.classifier import CLASSIFIER_FILE, load_classifier
from harmonica_core.digits.data import digits_split
from harmonica_core.digits.evaluate import score_digits
from harmonica_core.digits.model import WEIGHTS_DIR
from harmonica_core.sampling import GenerationRequest, generate


def test_classifier_is_accurate_on_held_out_real_digits():
    _, _, images, labels = digits_split()
    with torch.no_grad():
        accuracy = (load_classifier()(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95
    assert json.loads(CLASSIFIER_FILE.with_suffix(".json").read_text())["test_accuracy"] == accuracy


def test_uncached_ddim_20_step_samples_are_the_asked_for_digit(digits):
    labels = [c for c in range(10) for _ in range(8)]
    result = generate(digits, GenerationRequest(class_labels=labels, steps=20, guidance=1.5, seed=123))
    score = score_digits(result.images, labels)
    assert score.accuracy >= 0.9
    noise = torch.rand(80, 1, 8, 8)
    assert score.frechet < score_digits(noise, labels).frechet  # Frechet tells digits from noise


def test_recipe_is_recorded_beside_the_weights():
    recipe = json.loads((WEIGHTS_DIR / "recipe.json").read_text())
    assert recipe["command"].startswith("harmonica digits train") and recipe["config"]["seed"] == 0
    assert (WEIGHTS_DIR / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size < 20e6
