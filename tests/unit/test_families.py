"""The family and source doors: a family defined here, with its own branch modules, caches, generates and
is admitted through the registries alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from harmonica_core.cache.methods import make_plan
from harmonica_core.catalog import MODELS, ModelInfo
from harmonica_core.errors import InvalidRequest
from harmonica_core.families import FAMILIES, Conditioning, Family, family_of
from harmonica_core.models import SOURCES, Model, ModelSource, load_model
from harmonica_core.sampling import GenerationRequest, generate
from harmonica_core.validation import Limits, validate_generation


class TinyBlock(nn.Module):
    """A block whose branches are `mixer` and `mlp`, not diffusers' attn1/ff."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mixer = nn.Sequential(nn.Linear(width, width))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm(x + cond))
        return x + self.mlp(self.norm(x))


class TinyTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, sample_size: int = 4, patch_size: int = 1,
        num_embeds_ada_norm: int = 3, width: int = 16, layers: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.proj_in = nn.Linear(in_channels, width)
        self.time = nn.Linear(1, width)
        self.labels = nn.Embedding(num_embeds_ada_norm + 1, width)  # the last row is the null class
        self.transformer_blocks = nn.ModuleList(TinyBlock(width) for _ in range(layers))
        self.proj_out = nn.Linear(width, out_channels)

    def forward(self, hidden_states, timestep, shade, return_dict: bool = True):
        b, c, h, w = hidden_states.shape
        x = self.proj_in(hidden_states.flatten(2).transpose(1, 2))  # (B, HW, D)
        cond = (self.time(timestep.float()[:, None] / 1000) + self.labels(shade))[:, None]  # (B, 1, D)
        for block in self.transformer_blocks:
            x = block(x, cond)
        return (self.proj_out(x).transpose(1, 2).reshape(b, c, h, w),)


class TinyFamily(Family):
    """Class-conditional through a `shade` input, CFG batch [uncond; cond] (DiT's is the other way round)."""

    name = "tiny"
    pipelines: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    transformers = ("TinyTransformer",)
    branch_modules: ClassVar[Mapping[str, str]] = {"attn": "mixer", "mlp": "mlp"}
    class_conditional = True
    size_multiple = None

    def conditioning(self, model: Model, request: GenerationRequest) -> Conditioning:
        labels = [y for y in request.class_labels for _ in range(request.num_images_per_prompt)]
        shade, cfg = torch.tensor(labels), request.guidance > 1
        if cfg:
            shade = torch.cat([torch.full_like(shade, model.num_classes), shade])
        return Conditioning({"shade": shade}, len(labels), cfg, True, 0, [str(y) for y in labels])

    def meta_conditions(self, model: Model, device: torch.device, text_len: int) -> dict[str, Any]:
        return {"shade": torch.zeros(1, dtype=torch.long, device=device)}

    def training_conditions(self, model, data, count, generator, rows) -> dict[str, Any]:
        return {"class_labels": torch.randint(model.num_classes, (count,), generator=generator).tolist()}

    def evaluation_conditions(self, model, samples, captions, prompt_embeddings) -> dict[str, Any]:
        return {"class_labels": [i % model.num_classes for i in range(samples)]}


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Model:
    monkeypatch.setitem(FAMILIES, TinyFamily.name, TinyFamily())
    torch.manual_seed(0)
    transformer = TinyTransformer().eval().requires_grad_(False)
    return Model("tiny", TinyFamily.name, transformer, DDIMScheduler(clip_sample=False))


def _count_runs(transformer: TinyTransformer) -> dict[str, int]:
    """Real executions per branch, seen by a submodule that runs only when its branch computes."""
    counts: dict[str, int] = {}
    for index, block in enumerate(transformer.transformer_blocks):
        for kind, inner in (("attn", block.mixer[0]), ("mlp", block.mlp[0])):
            counts[f"{index}.{kind}"] = 0
            inner.register_forward_hook(lambda *_, name=f"{index}.{kind}": counts.__setitem__(name, counts[name] + 1))
    return counts


def test_a_family_registered_here_generates_with_fora_and_the_default_plan(tiny):
    assert family_of(tiny.transformer) is FAMILIES["tiny"]
    assert tiny.branch_layout == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    steps, n = 4, len(tiny.branch_layout)
    request = GenerationRequest(class_labels=[0, 2], steps=steps, guidance=2.0, seed=3)
    counts = _count_runs(tiny.transformer)
    outputs: list[torch.Tensor] = []
    tiny.transformer.transformer_blocks[0].mixer.register_forward_hook(lambda *args: outputs.append(args[2]))

    cached = generate(tiny, request, make_plan("fora", steps, tiny.branch_layout, interval=2))
    assert (cached.stats.computed, cached.stats.reused) == (2 * n, 2 * n)
    assert counts == dict.fromkeys(tiny.branch_layout, 2)  # steps 0 and 2 compute, 1 and 3 reuse
    assert outputs[1] is outputs[0] and outputs[3] is outputs[2]  # the cached tensor itself comes back
    assert outputs[0].shape[0] == 4  # CFG doubles the batch of two images
    assert cached.stats.theoretical_speedup > 1.5  # MACs counted on a meta copy through the family's inputs

    counts.update(dict.fromkeys(counts, 0))
    full = generate(tiny, request)
    assert (full.stats.computed, full.stats.reused) == (steps * n, 0)
    assert counts == dict.fromkeys(tiny.branch_layout, steps) and full.stats.theoretical_speedup == 1
    assert full.images.shape == cached.images.shape == (2, 1, 4, 4) and full.labels == ["0", "2"]
    assert torch.isfinite(cached.images).all()
    for module in tiny.transformer.modules():  # the cache left the model as it found it
        assert not hasattr(module, "_diffusers_hook") and "forward" not in module.__dict__


def test_a_family_is_admitted_by_its_own_rules_and_loaded_by_a_registered_source(tiny, monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", ModelInfo("a test family's model", TinyFamily.name, num_classes=3, size=4))
    body = {"model": "tiny", "class_labels": None, "prompts": None, "num_images": 1, "steps": 2, "scheduler": "ddim",
            "guidance": 1.5, "seed": 0, "height": None, "width": None, "acceleration": {"method": "none"}}  # fmt: skip
    assert validate_generation(body, Limits())["class_labels"] == [0, 1, 2]
    with pytest.raises(InvalidRequest, match="class-conditional"):
        validate_generation({**body, "prompts": ["a cat"]}, Limits())
    with pytest.raises(InvalidRequest, match="4x4 images only"):
        validate_generation({**body, "height": 8}, Limits())

    memory = ModelSource("a model in memory", lambda name: name == "tiny", lambda _: tiny)
    monkeypatch.setitem(SOURCES, "memory", memory)
    assert load_model("tiny") is tiny
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        Model("x", "nope", tiny.transformer, tiny.scheduler)
