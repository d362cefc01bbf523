"""The cacheable branches of a transformer (named by its family) and what each one costs (ALGORITHM.md §1, §6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .families import family_of


@dataclass(frozen=True)
class Branch:
    """One residual branch: the ungated output of the module at `module_path` (in `transformer_blocks[block]`)."""

    block: int
    kind: str  # attn | cross_attn | mlp
    module_path: str

    @property
    def name(self) -> str:
        return f"{self.block}.{self.kind}"


def find_branches(transformer: nn.Module) -> list[Branch]:
    """Branches in execution order, per block in the order of its family's `branch_modules`."""
    modules = family_of(transformer).branch_modules
    branches = []
    for index, block in enumerate(transformer.transformer_blocks):
        for kind, attribute in modules.items():
            if getattr(block, attribute, None) is not None:
                branches.append(Branch(index, kind, f"transformer_blocks.{index}.{attribute}"))
    return branches


def branch_layout(transformer: nn.Module) -> list[str]:
    return [branch.name for branch in find_branches(transformer)]


@dataclass(frozen=True)
class MacProfile:
    """Multiply-accumulates of one transformer forward for ONE sample, plus one decode of one image.

    `branch_macs[i]` is the cost of branch i; `transformer_macs` includes them and every always-run part
    (patch embedding, adaLN and timestep embeddings, final layer); `decode_macs` is the VAE decode (0 in
    pixel space).
    """

    branch_macs: tuple[int, ...]
    transformer_macs: int
    decode_macs: int

    @property
    def always_run_macs(self) -> int:
        return self.transformer_macs - sum(self.branch_macs)

    def generation_macs(self, reused: list[list[bool]] | None, steps: int, cfg: bool) -> int:
        """MACs of one image's generation; `reused[k][i]` marks branch i skipped at step k."""
        per_forward = self.transformer_macs * (2 if cfg else 1)
        total = steps * per_forward + self.decode_macs
        if reused:
            skipped = sum(m for row in reused for m, r in zip(self.branch_macs, row, strict=True) if r)
            total -= skipped * (2 if cfg else 1)
        return total


def count_macs(
    transformer: nn.Module,
    make_inputs: Callable[[torch.device], dict[str, Any]],
    decoder: nn.Module | None = None,
    latent_shape: tuple[int, ...] | None = None,
) -> MacProfile:
    """Count MACs on the meta device: the real architecture and resolution, nothing computed, no weights read.

    A copy of the architecture is built from its config on `meta`, so this works for DiT-XL/2 in a
    second without touching the loaded weights.
    """
    meta = torch.device("meta")
    with meta:
        shadow = type(transformer).from_config(transformer.config)
    branches = find_branches(shadow)
    with FlopCounterMode(display=False, depth=None) as counter:
        shadow(**make_inputs(meta), return_dict=False)
    flops = counter.get_flop_counts()
    root = type(shadow).__name__
    branch_macs = tuple(sum(flops.get(f"{root}.{b.module_path}", {}).values()) // 2 for b in branches)
    decode_macs = 0
    if decoder is not None and latent_shape is not None:
        with meta:
            vae_shadow = type(decoder).from_config(decoder.config)
        with FlopCounterMode(display=False) as counter:
            vae_shadow.decode(torch.empty(latent_shape, device=meta))
        decode_macs = counter.get_total_flops() // 2
    return MacProfile(branch_macs, sum(flops["Global"].values()) // 2, decode_macs)
