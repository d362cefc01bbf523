"""The digits DiT: its architecture, its training recipe, and loading the shipped weights."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from ..catalog import DIGITS_WEIGHTS, MODELS
from ..models import Model, ModelNotFoundError
from .data import IMAGE_SIZE, NUM_CLASSES, digits_split

WEIGHTS_DIR = DIGITS_WEIGHTS

# 64 tokens (patch 1 on 8x8) of width 192, 6 blocks: ~4.6M parameters, shipped in fp16 (~9 MB). Wide enough that the
# attention and MLP branches dominate the cost even on a CPU, so cache savings show up in wall time.
ARCHITECTURE = dict(
    sample_size=IMAGE_SIZE,
    patch_size=1,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    num_attention_heads=6,
    attention_head_dim=32,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
)
# DiT's noise schedule; DDIM with x0 clipping suits a pixel-space model in [-1, 1].
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=True)


@dataclass
class DigitsTrainConfig:
    """The recipe; stored beside the weights so the model can be rebuilt."""

    iterations: int = 12000
    batch_size: int = 256
    lr: float = 3e-4
    warmup: int = 500
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # null-class training for classifier-free guidance
    seed: int = 0


def load_digits(weights: Path = WEIGHTS_DIR) -> Model:
    """The shipped weights (or a copy of them) as a `Model`; `models.SOURCES` loads it as "digits"."""
    if not (weights / "transformer" / "config.json").is_file():
        raise ModelNotFoundError(
            f"the digits weights are missing from {weights}; rebuild them with `harmonica digits train`"
        )
    transformer = DiTTransformer2DModel.from_pretrained(
        weights / "transformer",
        torch_dtype=torch.float32,
        low_cpu_mem_usage=False,  # 9 MB: no need for accelerate
    )
    scheduler = DDIMScheduler.from_pretrained(weights / "scheduler")
    labels = {i: str(i) for i in range(NUM_CLASSES)}
    return Model("digits", MODELS["digits"].family, transformer, scheduler, labels=labels)


def train_digits(
    config: DigitsTrainConfig,
    out: Path = WEIGHTS_DIR,
    device: str = "cpu",
    on_progress: Callable[[int, float], None] | None = None,
    command: str = "",
) -> Path:
    """Train the digits DiT with epsilon prediction and write it as diffusers folders under `out`.

    Label dropout is done here rather than by diffusers' embedders: in train mode each block's
    embedder would drop labels independently, so the model trains in eval mode (dropout is 0 anyway).
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    images, labels, _, _ = digits_split()
    images, labels = images.to(device), labels.to(device)
    model = DiTTransformer2DModel(**ARCHITECTURE).to(device).eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_schedule = DDPMScheduler(**SCHEDULER)
    alphas = noise_schedule.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / config.warmup))
    start = time.time()
    for iteration in range(config.iterations):
        index = torch.randint(len(images), (config.batch_size,), device=device, generator=generator)
        x0, y = images[index], labels[index].clone()
        drop = torch.rand(y.shape, device=device, generator=generator) < config.label_dropout
        y[drop] = NUM_CLASSES
        t = torch.randint(SCHEDULER["num_train_timesteps"], (config.batch_size,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema_decay)
        if on_progress is not None:
            on_progress(iteration + 1, loss.item() if iteration % 50 == 0 else float("nan"))
    ema.to("cpu", torch.float16).save_pretrained(out / "transformer")  # fp16 on disk: ~9 MB
    DDIMScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    recipe = {
        "command": command,
        "config": asdict(config),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "seconds": round(time.time() - start, 1),
        "final_loss": loss.item(),
        "torch": torch.__version__,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out
