"""Image tensors to PIL images and labelled grids (for people, the README and the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor, scale: int = 1) -> list[Image.Image]:
    """[B, C, H, W] in [0, 1] -> PIL images (grey for one channel), enlarged `scale` times (nearest)."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for pixels in array:
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        out.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image)
    return out


def grid(images: torch.Tensor, captions: list[str], rows: int, scale: int = 8) -> Image.Image:
    """A labelled grid filled column by column (one column per label when `rows` = images per label)."""
    tiles = to_pil(images, scale)
    width, height = tiles[0].size
    caption_h = 14
    columns = -(-len(tiles) // rows)
    canvas = Image.new("L", (columns * (width + 4), rows * (height + caption_h + 4)), color=255)
    draw = ImageDraw.Draw(canvas)
    for index, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        x, y = (index // rows) * (width + 4), (index % rows) * (height + caption_h + 4)
        draw.text((x + 2, y), caption[:12], fill=0)
        canvas.paste(tile.convert("L"), (x, y + caption_h))
    return canvas


def save_images(images: torch.Tensor, captions: list[str], rows: int, out: Path) -> list[str]:
    """One PNG per image (`000.png`, ...) and `grid.png`, a labelled sheet with tiles of at least 64 px; each
    written then renamed, so a reader (or a rerun of the same job) never sees half a file. Returns the names."""
    out.mkdir(parents=True, exist_ok=True)
    sheet = grid(images, captions, rows, scale=max(1, 64 // images.shape[-1]))
    named = [(f"{index:03d}.png", image) for index, image in enumerate(to_pil(images))] + [("grid.png", sheet)]
    for name, image in named:
        tmp = out / f"{name}.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, out / name)
    return [name for name, _ in named[:-1]]
