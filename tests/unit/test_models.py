"""Loading: saved diffusers pipelines load through our loader and generate; missing models fail clearly."""

from __future__ import annotations

import pytest
import torch

from harmonica_core.cache.methods import fora_plan
from harmonica_core.catalog import MODELS
from harmonica_core.families import FAMILIES, pipeline_family
from harmonica_core.models import ModelNotFoundError, load_model
from harmonica_core.sampling import GenerationRequest, generate


def test_saved_dit_pipeline_loads_and_generates_with_a_cache(dit_folder):
    model = load_model(str(dit_folder))
    assert model.family == "dit" and model.vae is not None and model.default_size == 8
    steps = 4
    request = GenerationRequest(class_labels=[0, 999], steps=steps, scheduler="dpm-solver++", num_images_per_prompt=2)
    result = generate(model, request, fora_plan(steps, len(model.branch_layout), 2))
    assert result.images.shape == (4, 3, 8, 8)
    assert result.stats.cache_usage_rate == pytest.approx(0.5)
    assert len(result.stats.step_seconds) == steps and result.stats.total_seconds > 0
    assert result.labels == ["0", "0", "999", "999"]


def test_saved_pixart_pipeline_loads_and_generates(pixart_folder, prompt_embeddings):
    model = load_model(str(pixart_folder))
    assert model.family == "pixart" and model.pipeline.text_encoder is None
    request = GenerationRequest(prompt_embeddings=prompt_embeddings, steps=3, guidance=3.0)
    result = generate(model, request, fora_plan(3, len(model.branch_layout), 2))
    assert result.images.shape == (2, 3, 8, 8) and torch.isfinite(result.images).all()
    assert result.stats.reused == len(model.branch_layout)
    with pytest.raises(ValueError, match="no text encoder"):
        generate(model, GenerationRequest(prompts=["a cat"], steps=2))


def test_bad_requests_are_refused_with_a_reason(tiny_dit, digits):
    with pytest.raises(ValueError, match="class labels must be in"):
        generate(digits, GenerationRequest(class_labels=[10], steps=2))
    with pytest.raises(ValueError, match="8x8 images only"):
        generate(digits, GenerationRequest(class_labels=[1], steps=2, height=16, width=16))
    with pytest.raises(ValueError, match="unknown scheduler"):
        generate(tiny_dit, GenerationRequest(class_labels=[1], steps=2, scheduler="heun"))


def test_every_catalog_model_names_a_registered_family():
    assert {info.family for info in MODELS.values()} <= FAMILIES.keys()
    assert pipeline_family("PixArtSigmaPipeline") is FAMILIES["pixart"] and pipeline_family("FluxPipeline") is None


def test_missing_models_give_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="hf download facebook/DiT-XL-2-256"):
        load_model("facebook/DiT-XL-2-256")
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline"):
        load_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        load_model(str(tmp_path / "nowhere" / "model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_is_refused_clearly_without_a_gpu():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model("digits", device="cuda")
