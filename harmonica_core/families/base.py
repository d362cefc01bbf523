"""What a model family says, as one small abstract base: its branches, conditioning, decoding, sizes, admission.

Importable without torch (the gateway's request validation reads the admission facts): the runtime
methods import torch where they run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ..models import Model
    from ..sampling import GenerationRequest, PromptEmbeddings
    from ..training import TrainData


@dataclass
class Conditioning:
    """Transformer keyword inputs for the whole batch the transformer sees (CFG-doubled when `cfg`).

    `uncond_first` is the family's CFG batch order, which `sampling.predict_noise` splits by.
    """

    kwargs: dict[str, Any]
    images: int
    cfg: bool
    uncond_first: bool
    text_len: int
    captions: list[str]

    @property
    def rows(self) -> int:
        """Rows of the transformer batch: images, doubled by guidance."""
        return self.images * (2 if self.cfg else 1)


@dataclass
class Precomputed:
    """What a generation's transformer calls need that depends only on (step, condition), computed before the
    loop (`Family.precompute`): `blocks[i][k]` is block i's modulation at step k, `head[k]` the final layer's,
    `context` the step-independent block inputs (projected text states, masks)."""

    blocks: list[torch.Tensor]
    head: torch.Tensor
    context: dict[str, torch.Tensor]


class Family(ABC):
    """One kind of diffusion transformer, as the loader, sampler, trainer, MAC counter and validation see it.

    Attributes:
        name: its key in `FAMILIES` (and in `catalog.ModelInfo.family`).
        pipelines: the diffusers pipeline classes it loads, each with the `Model` fields it implies.
        transformers: the transformer classes whose branches it describes (matched along the MRO).
        branch_modules: branch kind -> module of `transformer_blocks[i]`, in execution order; the order
            and kinds name the branches (`<block>.<kind>`), which router files record, so never reorder.
        class_conditional: requests give class labels (else prompts).
        size_multiple: None: only the model's own size; else sides are multiples of it, up to
            `ModelInfo.max_size` (admission of catalog models; a loaded model checks its latent grid).
    """

    name: ClassVar[str]
    pipelines: ClassVar[Mapping[str, Mapping[str, Any]]]
    transformers: ClassVar[tuple[str, ...]]
    branch_modules: ClassVar[Mapping[str, str]] = {"attn": "attn1", "cross_attn": "attn2", "mlp": "ff"}
    class_conditional: ClassVar[bool]
    size_multiple: ClassVar[int | None]

    @abstractmethod
    def conditioning(self, model: Model, request: GenerationRequest) -> Conditioning:
        """The CFG batch exactly as the family's diffusers pipeline builds it."""

    @abstractmethod
    def meta_conditions(self, model: Model, device: torch.device, text_len: int) -> dict[str, Any]:
        """The conditioning inputs of one meta-device forward for MAC counting (one sample)."""

    @abstractmethod
    def training_conditions(
        self, model: Model, data: TrainData, count: int, generator: torch.Generator, rows: torch.Tensor | None
    ) -> dict[str, Any]:
        """`GenerationRequest` fields for a training batch of `count`, drawn from `generator`; `rows`: the
        `data.samples` rows an L2C batch drew (their labels, if any, condition it)."""

    @abstractmethod
    def evaluation_conditions(
        self, model: Model, samples: int, captions: tuple[str, ...], prompt_embeddings: PromptEmbeddings | None
    ) -> dict[str, Any]:
        """`GenerationRequest` fields of a fixed evaluation set: classes, captions or embedding rows in turn."""

    @property
    def runs_blocks(self) -> bool:
        """Whether the family implements the planned forward (`precompute`, `block_forward`, `head`); one that
        does not runs in the eager mode only."""
        return type(self).block_forward is not Family.block_forward

    def precompute(
        self, transformer: torch.nn.Module, timesteps: torch.Tensor, kwargs: dict[str, Any], rows: int
    ) -> Precomputed:
        """The modulations of every block and of the final layer for all `timesteps` in a few batched calls, from
        the conditioning kwargs of a `rows`-row batch; the eager forward computes them in every block, every step."""
        raise NotImplementedError

    def block_forward(
        self,
        block: torch.nn.Module,
        x: torch.Tensor,
        mods: torch.Tensor,
        context: dict[str, torch.Tensor],
        cached: tuple[torch.Tensor | None, ...],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One block on tokens `x` with its precomputed `mods`: branch j computes where `cached[j]` is None and
        reuses `cached[j]` otherwise, skipping its norm and modulation too. Returns the tokens and every branch
        output (ungated, as the cache stores them). Pure tensor code, so `torch.compile` captures it whole."""
        raise NotImplementedError

    def head(self, transformer: torch.nn.Module, x: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        """The final layer on the tokens, with its precomputed modulation, before unpatchifying."""
        raise NotImplementedError

    def unpatchify(self, transformer: torch.nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens [B, h*w, p*p*C] back to the latent grid [B, C, height, width], as both diffusers transformers do."""
        import torch

        p, channels = transformer.config.patch_size, transformer.out_channels
        x = x.reshape(-1, height // p, width // p, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, channels, height, width)

    def guide(self, model: Model, out: torch.Tensor, cond: Conditioning, guidance: float) -> torch.Tensor:
        """The eps from the transformer's output on the CFG batch: guided in the batch's order, learned sigma
        dropped (diffusers' DiT and PixArt pipelines alike)."""
        if cond.cfg:
            first, second = out.chunk(2)
            uncond, guided = (first, second) if cond.uncond_first else (second, first)
            out = uncond + guidance * (guided - uncond)
        if model.transformer.config.out_channels // 2 == model.latent_channels:  # learned sigma
            out = out[:, : model.latent_channels]
        return out

    def unscale_latents(self, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
        """Latents as the VAE decodes them; the rounding differs between pipelines, so each family mirrors its own."""
        return latents / scaling_factor

    def meta_inputs(self, model: Model, device: torch.device, latent: tuple[int, ...], text_len: int) -> dict[str, Any]:
        """Keyword inputs of one meta-device forward at the given latent shape and text length."""
        import torch

        return {
            "hidden_states": torch.empty(latent, device=device),
            "timestep": torch.zeros(1, dtype=torch.long, device=device),
        } | self.meta_conditions(model, device, text_len)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
