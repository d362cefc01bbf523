"""Loading models from their sources (the built-in `digits`, a local diffusers folder, a hub id), and the
loaded `Model`: a transformer with its scheduler, VAE and family (`families.FAMILIES`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, SchedulerMixin
from torch import nn

from .branches import MacProfile, branch_layout, count_macs
from .catalog import MODELS, SCHEDULER_NAMES
from .families import FAMILIES, Family, pipeline_family
from .router import RouterTarget

SCHEDULERS: dict[str, type[SchedulerMixin]] = dict(
    zip(SCHEDULER_NAMES, (DDIMScheduler, DPMSolverMultistepScheduler), strict=True)
)

__all__ = ["MODELS", "SCHEDULERS", "SOURCES", "Model", "ModelNotFoundError", "ModelSource", "load_model"]


class ModelNotFoundError(FileNotFoundError):
    """The model is neither built in, nor a local folder, nor in the Hugging Face cache."""


@dataclass
class Model:
    """A loaded transformer with what generation needs around it.

    `family` is a key of `families.FAMILIES` (`spec` is that family: conditioning, CFG order, decoding,
    sizes); `vae` is None for pixel-space models such as `digits`.
    """

    name: str
    family: str
    transformer: nn.Module
    scheduler: SchedulerMixin
    vae: nn.Module | None = None
    pipeline: Any = None  # the diffusers pipeline, for encode_prompt (PixArt)
    labels: dict[int, str] = field(default_factory=dict)
    max_sequence_length: int = 120

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; registered: {', '.join(FAMILIES)}")

    @property
    def spec(self) -> Family:
        """The family's behaviour, looked up by key: models and catalog entries name families alike."""
        return FAMILIES[self.family]

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def default_size(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_scale

    @cached_property
    def branch_layout(self) -> list[str]:
        return branch_layout(self.transformer)

    @cached_property
    def fingerprint(self) -> str:
        """Config plus a sample of every weight tensor: cheap even for XL models, changes with the weights.

        Private config keys (`_name_or_path`, `_diffusers_version`) are left out: moving or re-saving the
        same model must not change it.
        """
        config = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in self.transformer.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Resolve and validate the image size; some families (DiT) have one fixed size."""
        height, width = height or self.default_size, width or self.default_size
        step = self.vae_scale * int(self.transformer.config.patch_size)
        if self.spec.size_multiple is None and (height, width) != (self.default_size, self.default_size):
            raise ValueError(f"{self.name} generates {self.default_size}x{self.default_size} images only")
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step} for {self.name}")
        return height, width

    def latent_shape(self, images: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape the transformer denoises for `images` images of height x width pixels."""
        return (images, self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    def make_scheduler(self, name: str, steps: int) -> SchedulerMixin:
        """A fresh scheduler of the named kind (schedulers keep per-run state), from the model's config,
        set to `steps` steps and ready to run from its first step. Its timesteps stay on the CPU: the schedulers
        branch in Python on the timestep (DDIM's `prev_timestep >= 0`), which on a device tensor makes every
        step wait for the GPU; the transformer gets a device copy made once (`execution.transformer_forward`)."""
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        scheduler = SCHEDULERS[name].from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler

    def router_target(self, scheduler_name: str, steps: int) -> RouterTarget:
        scheduler = self.make_scheduler(scheduler_name, steps)
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        return RouterTarget(
            architecture=type(self.transformer).__name__,
            model_fingerprint=self.fingerprint,
            branch_layout=self.branch_layout,
            scheduler_class=type(scheduler).__name__,
            scheduler_config=json.loads(json.dumps(config, default=str)),
            steps=steps,
            timesteps=[int(t) for t in scheduler.timesteps.tolist()],
        )

    def mac_profile(self, height: int, width: int, text_len: int = 0) -> MacProfile:
        key = (height, width, text_len)
        profiles = self.__dict__.setdefault("_mac_profiles", {})
        if key not in profiles:
            latent = self.latent_shape(1, height, width)
            profiles[key] = count_macs(
                self.transformer, lambda device: self.spec.meta_inputs(self, device, latent, text_len), self.vae, latent
            )
        return profiles[key]


@dataclass(frozen=True)
class ModelSource:
    """One place models come from: `takes(name)` claims a model name, `load(name)` reads it onto the CPU."""

    description: str
    takes: Callable[[str], bool]
    load: Callable[[str], Model]


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Model:
    """Load `name` from the first source in `SOURCES` that takes it: `digits`, a local diffusers pipeline
    folder, or a hub id from the local Hugging Face cache.

    Without `HF_HUB_OFFLINE=1`, a hub id missing from the cache is downloaded by diffusers as usual.
    """
    device = _check_device(device)
    source = next((source for source in SOURCES.values() if source.takes(name)), None)
    if source is None:
        choices = ", ".join(source.description for source in SOURCES.values())
        raise ModelNotFoundError(f"no model folder at {name}; give {choices}")
    model = source.load(name)
    if device.type == "cpu":
        # Denormal floats (seen with L2C's noised real digits) make CPU math ~6x slower; flushing them
        # to zero changes nothing above 1e-38. Process-wide, like the thread count.
        torch.set_flush_denormal(True)
    if model.pipeline is not None:
        model.pipeline.to(device, dtype) if dtype is not None else model.pipeline.to(device)
    for module in (model.transformer, model.vae):
        if module is not None:
            module.eval().requires_grad_(False).to(device)
            if dtype is not None:
                module.to(dtype)
    return model


def _check_device(device: str | torch.device) -> torch.device:
    """Refuse a device this machine cannot use before any weights are read."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available here; use --device cpu")
    return device


def _load_digits(_name: str) -> Model:
    from .digits.model import load_digits  # digits builds on this module: imported only when asked for

    return load_digits()


def _load_folder(name: str) -> Model:
    path = Path(name).expanduser()
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    return _load_pipeline_folder(name, path)


def _is_hub_id(name: str) -> bool:
    """`owner/name`, and nothing that looks like a path."""
    return not (Path(name).suffix or name.startswith((".", "/", "~")) or name.count("/") != 1)


def _load_hub(name: str) -> Model:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        folder = Path(snapshot_download(name, local_files_only=offline))
    except Exception as error:  # huggingface_hub raises several kinds here; all mean "not available"
        raise ModelNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' and could not be downloaded'}: run "
            f"`hf download {name}` (huggingface_hub's CLI) on a machine with internet and copy ~/.cache/huggingface, "
            f"or pass a local diffusers folder ({type(error).__name__})"
        ) from None
    return _load_pipeline_folder(name, folder)


def _load_pipeline_folder(name: str, folder: Path) -> Model:
    from diffusers import DiffusionPipeline

    class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    family = pipeline_family(class_name)
    if family is None:
        supported = ", ".join(pipeline for family in FAMILIES.values() for pipeline in family.pipelines)
        raise ModelNotFoundError(f"{name} is a {class_name or 'unknown'} pipeline; supported: {supported}")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    labels = {int(k): v for k, v in (getattr(pipe, "id2label", None) or {}).items()}
    return Model(
        name=name,
        family=family.name,
        transformer=pipe.transformer,
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        pipeline=pipe,
        labels=labels,
        **family.pipelines[class_name],
    )


# Tried in order; the first that takes a name loads it.
SOURCES: dict[str, ModelSource] = {
    "builtin": ModelSource("'digits' (built in)", lambda name: name == "digits", _load_digits),
    "folder": ModelSource("a diffusers pipeline folder", lambda name: Path(name).expanduser().is_dir(), _load_folder),
    "hub": ModelSource("a hub id (owner/name) in the local Hugging Face cache", _is_hub_id, _load_hub),
}
