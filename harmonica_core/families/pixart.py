"""PixArt-α/Σ: text-to-image from prompts or T5 embeddings, free sizes, CFG batch [uncond; cond]
(diffusers' `PixArtAlphaPipeline` and `PixArtSigmaPipeline`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Conditioning, Family, Precomputed

if TYPE_CHECKING:
    import torch

    from ..models import Model
    from ..sampling import GenerationRequest, PromptEmbeddings
    from ..training import TrainData


class PixArtFamily(Family):
    name = "pixart"
    pipelines: ClassVar[Mapping[str, Mapping[str, Any]]] = {  # the text encoder's token limit
        "PixArtAlphaPipeline": {"max_sequence_length": 120},
        "PixArtSigmaPipeline": {"max_sequence_length": 300},
    }
    transformers = ("PixArtTransformer2DModel",)
    class_conditional = False
    size_multiple = 16

    def conditioning(self, model: Model, request: GenerationRequest) -> Conditioning:
        import torch

        device, cfg = model.device, request.guidance > 1
        if model.pipeline is None:
            raise ValueError(f"{model.name} has no pipeline to encode prompts with")
        pe = request.prompt_embeddings
        if pe is None and not request.prompts:
            raise ValueError(f"{model.name} is text-to-image: give prompts")
        if pe is None and model.pipeline.text_encoder is None:
            raise ValueError(f"{model.name} has no text encoder: give precomputed prompt embeddings")
        embeds, mask, neg, neg_mask = model.pipeline.encode_prompt(
            request.prompts if pe is None else None,
            do_classifier_free_guidance=cfg,
            negative_prompt="" if pe is None else None,
            num_images_per_prompt=request.num_images_per_prompt,
            device=device,
            prompt_embeds=None if pe is None else pe.embeds.to(device),
            prompt_attention_mask=None if pe is None else pe.mask.to(device),
            negative_prompt_embeds=None if pe is None or pe.negative_embeds is None else pe.negative_embeds.to(device),
            negative_prompt_attention_mask=None
            if pe is None or pe.negative_mask is None
            else pe.negative_mask.to(device),
            clean_caption=False,
            max_sequence_length=model.max_sequence_length,
        )
        images = embeds.shape[0]
        if cfg:  # [uncond; cond]
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        height, width = model.check_size(request.height, request.width)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if model.transformer.config.sample_size == 128:
            resolution = torch.tensor([height, width]).repeat(images, 1).to(embeds.dtype).to(device)
            aspect = torch.tensor([float(height / width)]).repeat(images, 1).to(embeds.dtype).to(device)
            if cfg:
                resolution, aspect = torch.cat([resolution, resolution]), torch.cat([aspect, aspect])
            added = {"resolution": resolution, "aspect_ratio": aspect}
        captions = (
            [p for p in request.prompts for _ in range(request.num_images_per_prompt)]
            if request.prompts
            else [f"embedding {i}" for i in range(images)]
        )
        kwargs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": added}
        return Conditioning(kwargs, images, cfg, True, embeds.shape[1], captions)

    def meta_conditions(self, model: Model, device: torch.device, text_len: int) -> dict[str, Any]:
        import torch

        config = model.transformer.config
        channels = config.caption_channels or config.cross_attention_dim
        length = text_len or model.max_sequence_length
        extra = config.use_additional_conditions or (
            config.use_additional_conditions is None and config.sample_size == 128
        )
        added = (
            {"resolution": torch.empty(1, 2, device=device), "aspect_ratio": torch.empty(1, 1, device=device)}
            if extra
            else {"resolution": None, "aspect_ratio": None}
        )
        return {"encoder_hidden_states": torch.empty(1, length, channels, device=device), "added_cond_kwargs": added}

    def training_conditions(
        self, model: Model, data: TrainData, count: int, generator: torch.Generator, rows: torch.Tensor | None
    ) -> dict[str, Any]:
        import torch

        return _prompts(
            lambda pool: torch.randint(pool, (count,), generator=generator).tolist(),
            data.captions,
            data.prompt_embeddings,
        )

    def evaluation_conditions(
        self, model: Model, samples: int, captions: tuple[str, ...], prompt_embeddings: PromptEmbeddings | None
    ) -> dict[str, Any]:
        return _prompts(lambda pool: [i % pool for i in range(samples)], captions, prompt_embeddings)

    def precompute(
        self, transformer: torch.nn.Module, timesteps: torch.Tensor, kwargs: dict[str, Any], rows: int
    ) -> Precomputed:
        steps, dim, dtype = len(timesteps), transformer.inner_dim, transformer.dtype
        added = kwargs["added_cond_kwargs"]
        if transformer.use_additional_conditions:  # step-major rows, like the timesteps
            added = {name: value.repeat(steps, 1) for name, value in added.items()}
        t, embedded = transformer.adaln_single(
            timesteps.repeat_interleave(rows), added, batch_size=steps * rows, hidden_dtype=dtype
        )
        t = t.view(steps, rows, 6, dim)
        blocks = [  # the eager block's `scale_shift_table[None] + timestep.reshape(B, 6, -1)` as [T, 6, rows, 1, D]
            (block.scale_shift_table[None, None] + t).permute(0, 2, 1, 3).unsqueeze(3).contiguous()
            for block in transformer.transformer_blocks
        ]
        head = transformer.scale_shift_table[None, None] + embedded.view(steps, rows, 1, dim)
        text = kwargs["encoder_hidden_states"]
        if transformer.caption_projection is not None:
            text = transformer.caption_projection(text).view(rows, -1, dim)
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None and mask.ndim == 2:
            mask = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
        return Precomputed(blocks, head.permute(0, 2, 1, 3).unsqueeze(3).contiguous(), {"text": text, "mask": mask})

    def block_forward(
        self,
        block: torch.nn.Module,
        x: torch.Tensor,
        mods: torch.Tensor,
        context: dict[str, torch.Tensor],
        cached: tuple[torch.Tensor | None, ...],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """diffusers' `BasicTransformerBlock` with `ada_norm_single` (PixArt), op for op."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(0)
        attn, cross, mlp = cached
        if attn is None:
            attn = block.attn1(block.norm1(x) * (1 + scale_msa) + shift_msa)
        x = gate_msa * attn + x
        if cross is None:
            cross = block.attn2(x, encoder_hidden_states=context["text"], attention_mask=context["mask"])
        x = cross + x
        if mlp is None:
            mlp = block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
        x = gate_mlp * mlp + x
        return x, (attn, cross, mlp)

    def head(self, transformer: torch.nn.Module, x: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        shift, scale = mods.unbind(0)
        return transformer.proj_out(transformer.norm_out(x) * (1 + scale) + shift)


def _prompts(
    pick: Callable[[int], list[int]], captions: tuple[str, ...], embeddings: PromptEmbeddings | None
) -> dict[str, Any]:
    """Embedding rows when there are embeddings (no text encoder), else captions; `pick(pool)` chooses the rows."""
    if embeddings is not None:
        return {"prompt_embeddings": embeddings.select(pick(len(embeddings.embeds)))}
    return {"prompts": [captions[i] for i in pick(len(captions))]}
