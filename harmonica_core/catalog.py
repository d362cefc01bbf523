"""What the library offers, without importing torch: models, schedulers, objectives, built-in routers.

The service gateway validates requests and lists routers from this module alone, so it starts fast
and never loads torch; the modules that run models import their names from here.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULER_NAMES = ("ddim", "dpm-solver++")
EXECUTION_MODES = {  # how a generation runs the transformer (`execution.py`); all give the same images
    "auto": "the fastest measured on the device: graphs on CUDA, precomputed elsewhere",
    "eager": "diffusers' forward with cache hooks (the reference; router training uses it)",
    "precomputed": "step-only modulations computed before the loop; a reused branch skips its norm too",
    "compiled": "precomputed, with each block variant compiled by torch.compile (compiles once per process)",
    "graphs": "compiled, each step pattern of a plan captured once per shape as a CUDA graph (CUDA only; "
    "elsewhere it runs compiled)",
}
DEFAULT_EXECUTION_MODE = "auto"  # see the README's speed section for the measurements behind it
OBJECTIVES = {
    "iepo": "SDT with the Image-Error-Proxy-Guided Objective: per-step loss weighted by lambda_k (HarmoniCa)",
    "ltc": "SDT with lambda_k = 1 (the paper's ablation)",
    "l2c": "Learning-to-Cache: per-step training from noised real data, alternating inference",
    "image": "the final image's own error, back through the whole trajectory, at the target speedup's plan (ours)",
}
LAMBDA_MODES = ("cumulative", "leave_one_out", "gain")
OPTIMIZER_STATES = ("table", "rows")
DIGITS_WEIGHTS = Path(__file__).parent / "digits" / "weights"
BUILTIN_ROUTERS_DIR = DIGITS_WEIGHTS / "routers"


@dataclass(frozen=True)
class ModelInfo:
    """Static facts a caller can check a request against before any weights load."""

    description: str
    family: str  # a key of `families.FAMILIES`: its admission rules (class labels or prompts, sizes)
    num_classes: int = 0  # class-conditional families: labels are 0..num_classes-1
    size: int = 0  # default (and, for fixed-size families, only) image side in pixels
    max_size: int = 0  # the largest side; fixed-size families: their size

    def __post_init__(self) -> None:
        if not self.max_size:
            object.__setattr__(self, "max_size", self.size)


MODELS: dict[str, ModelInfo] = {
    "digits": ModelInfo(
        "built-in class-conditional DiT on scikit-learn's 8x8 handwritten digits (pixel space, CPU-friendly)",
        "dit",
        10,
        8,
    ),
    "facebook/DiT-XL-2-256": ModelInfo(
        "DiT-XL/2, ImageNet 256x256, class-conditional (from the local Hugging Face cache)", "dit", 1000, 256
    ),
    "facebook/DiT-XL-2-512": ModelInfo(
        "DiT-XL/2, ImageNet 512x512, class-conditional (from the local Hugging Face cache)", "dit", 1000, 512
    ),
    "PixArt-alpha/PixArt-XL-2-512x512": ModelInfo(
        "PixArt-α 512px, text-to-image (from the local Hugging Face cache)", "pixart", size=512, max_size=1024
    ),
    "PixArt-alpha/PixArt-XL-2-1024-MS": ModelInfo(
        "PixArt-α 1024px, text-to-image (from the local Hugging Face cache)", "pixart", size=1024, max_size=2048
    ),
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": ModelInfo(
        "PixArt-Σ 1024px, text-to-image (from the local Hugging Face cache)", "pixart", size=1024, max_size=2048
    ),
}


def builtin_routers() -> dict[str, Path]:
    """Shipped digits routers by id: files named `<objective>_<scheduler>_T<steps>[_x<target speedup>]`, with `p`
    for a decimal point (`image_ddim_T20_x2p5`), have the id `builtin-digits-` + the name in lowercase with dashes."""
    paths = sorted(BUILTIN_ROUTERS_DIR.glob("*_T*.safetensors"))
    return {"builtin-digits-" + path.stem.replace("_", "-").lower(): path for path in paths}


def default_builtin_router(scheduler: str, steps: int) -> str:
    """The id `--router builtin` stands for: the image objective's router at 2x (README, "Built-in routers")."""
    return f"builtin-digits-image-{scheduler}-t{steps}-x2"


def read_safetensors_header(source: str | Path | bytes) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its tensor data starts (no torch). `source` is
    the file, or its content (a router read from an object store, an upload).

    The layout is an 8-byte little-endian header length, then the JSON header: tensor name -> dtype, shape,
    data offsets, and `__metadata__` (strings).
    """
    name = "the data" if isinstance(source, bytes) else str(source)
    with io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{name} is not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 10_000_000:
            raise ValueError(f"{name} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{name} is not a safetensors file") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} is not a safetensors file")
    return header, 8 + length


def read_router_metadata(source: str | Path | bytes) -> dict[str, Any]:
    """A router file's JSON metadata, `__metadata__["harmonica"]` of its header (see `router.save_router`); `source`
    is the file or its content."""
    header, _ = read_safetensors_header(source)
    blob = (header.get("__metadata__") or {}).get("harmonica")
    if blob is None:
        name = "the data" if isinstance(source, bytes) else str(source)
        raise ValueError(f"{name} is a safetensors file but not a HarmoniCa router (no 'harmonica' metadata)")
    metadata = json.loads(blob)
    if metadata.get("format_version", 1) < 2:  # version 1 kept the inference method among the quality numbers
        metadata["method"] = metadata.get("quality", {}).pop("method", "harmonica")
        metadata["format_version"] = 2
    return metadata
