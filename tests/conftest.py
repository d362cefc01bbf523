"""Shared fixtures: tiny random diffusers pipelines saved with save_pretrained, and the built-in digits model.

Each test is marked by its folder: `unit` (no service), `service` (real redis-server and worker processes),
`deploy` (docker-compose, promtool, a real Prometheus); `pytest -m unit` runs one kind."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

from harmonica_core.models import Model, load_model
from harmonica_core.sampling import PromptEmbeddings

KINDS = ("unit", "service", "deploy", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = next((part for part in item.path.parts[::-1] if part in KINDS), None)
        if kind is not None:
            item.add_marker(kind)


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )  # fmt: skip
    pipe = DiTPipeline(transformer=transformer, vae=AutoencoderKL(), scheduler=DDIMScheduler())
    folder = tmp_path_factory.mktemp("tiny-dit")
    pipe.save_pretrained(folder)
    return folder


def tiny_pixart_transformer(use_additional_conditions: bool) -> PixArtTransformer2DModel:
    """A tiny random PixArt transformer; with `use_additional_conditions` its adaLN also embeds the resolution
    and aspect ratio, as PixArt-α 1024 does."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", use_additional_conditions=use_additional_conditions,
    )  # fmt: skip


@pytest.fixture(scope="session")
def pixart_folder(tmp_path_factory: pytest.TempPathFactory):
    transformer = tiny_pixart_transformer(use_additional_conditions=False)
    pipe = PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=AutoencoderKL(), transformer=transformer, scheduler=DDIMScheduler()
    )
    folder = tmp_path_factory.mktemp("tiny-pixart")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_dit(dit_folder) -> Model:
    return load_model(str(dit_folder))


@pytest.fixture
def tiny_pixart(pixart_folder) -> Model:
    return load_model(str(pixart_folder))


@pytest.fixture
def tiny_pixart_with_sizes() -> Model:
    """The tiny PixArt with resolution and aspect-ratio conditioning, as a bare transformer (no pipeline)."""
    return Model("tiny pixart 1024-style", "pixart", tiny_pixart_transformer(True).eval(), DDIMScheduler())


@pytest.fixture
def prompt_embeddings() -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(1)
    return PromptEmbeddings(
        embeds=torch.randn(2, 6, 32, generator=generator),
        mask=torch.ones(2, 6, dtype=torch.long),
        negative_embeds=torch.randn(2, 6, 32, generator=generator),
        negative_mask=torch.ones(2, 6, dtype=torch.long),
    )


@pytest.fixture(scope="session")
def digits() -> Model:
    return load_model("digits")
