"""DiT: class-conditional, one image size, CFG batch [cond; uncond] with the null class (diffusers' `DiTPipeline`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Conditioning, Family, Precomputed

if TYPE_CHECKING:
    import torch

    from ..models import Model
    from ..sampling import GenerationRequest, PromptEmbeddings
    from ..training import TrainData


class DiTFamily(Family):
    name = "dit"
    pipelines: ClassVar[Mapping[str, Mapping[str, Any]]] = {"DiTPipeline": {}}
    transformers = ("DiTTransformer2DModel",)
    class_conditional = True
    size_multiple = None

    def conditioning(self, model: Model, request: GenerationRequest) -> Conditioning:
        import torch

        if not request.class_labels:
            raise ValueError(f"{model.name} is class-conditional: give class labels")
        bad = [y for y in request.class_labels if not 0 <= y < model.num_classes]
        if bad:
            raise ValueError(f"class labels must be in [0, {model.num_classes - 1}] for {model.name}; got {bad}")
        cfg = request.guidance > 1
        labels = [y for y in request.class_labels for _ in range(request.num_images_per_prompt)]
        y = torch.tensor(labels, device=model.device)
        if cfg:  # [cond; uncond]; the null class is the last embedding row
            y = torch.cat([y, torch.full_like(y, model.num_classes)])
        captions = [model.labels.get(v, str(v)) for v in labels]
        return Conditioning({"class_labels": y}, len(labels), cfg, False, 0, captions)

    def meta_conditions(self, model: Model, device: torch.device, text_len: int) -> dict[str, Any]:
        import torch

        return {"class_labels": torch.zeros(1, dtype=torch.long, device=device)}

    def training_conditions(
        self, model: Model, data: TrainData, count: int, generator: torch.Generator, rows: torch.Tensor | None
    ) -> dict[str, Any]:
        import torch

        if rows is not None and data.labels is not None:
            return {"class_labels": data.labels[rows].tolist()}
        return {"class_labels": torch.randint(min(model.num_classes, 1000), (count,), generator=generator).tolist()}

    def evaluation_conditions(
        self, model: Model, samples: int, captions: tuple[str, ...], prompt_embeddings: PromptEmbeddings | None
    ) -> dict[str, Any]:
        return {"class_labels": [i % min(model.num_classes, 10) for i in range(samples)]}

    def unscale_latents(self, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
        return 1 / scaling_factor * latents  # DiTPipeline multiplies by 1/s

    def precompute(
        self, transformer: torch.nn.Module, timesteps: torch.Tensor, kwargs: dict[str, Any], rows: int
    ) -> Precomputed:
        import torch.nn.functional as F

        steps, dim, dtype = len(timesteps), transformer.inner_dim, transformer.dtype
        t, y = timesteps.repeat_interleave(rows), kwargs["class_labels"].repeat(steps)  # step-major rows

        def per_step(mods: torch.Tensor, parts: int) -> torch.Tensor:  # [T*rows, parts*D] -> [T, parts, rows, 1, D]
            return mods.view(steps, rows, parts, dim).permute(0, 2, 1, 3).unsqueeze(3).contiguous()

        blocks = []
        for block in transformer.transformer_blocks:  # each block embeds (t, y) with weights of its own
            norm = block.norm1
            blocks.append(per_step(norm.linear(norm.silu(norm.emb(t, y, hidden_dtype=dtype))), 6))
        conditioning = transformer.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=dtype)
        return Precomputed(blocks, per_step(transformer.proj_out_1(F.silu(conditioning)), 2), {})

    def block_forward(
        self,
        block: torch.nn.Module,
        x: torch.Tensor,
        mods: torch.Tensor,
        context: dict[str, torch.Tensor],
        cached: tuple[torch.Tensor | None, ...],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """diffusers' `BasicTransformerBlock` with `ada_norm_zero`, op for op."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(0)
        attn, mlp = cached
        if attn is None:
            attn = block.attn1(block.norm1.norm(x) * (1 + scale_msa) + shift_msa)
        x = gate_msa * attn + x
        if mlp is None:
            mlp = block.ff(block.norm3(x) * (1 + scale_mlp) + shift_mlp)
        x = gate_mlp * mlp + x
        return x, (attn, mlp)

    def head(self, transformer: torch.nn.Module, x: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        shift, scale = mods.unbind(0)
        return transformer.proj_out_2(transformer.norm_out(x) * (1 + scale) + shift)
