"""MAC accounting on the real DiT-XL/2 architecture, counted on the meta device (nothing runs)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from harmonica_core.branches import count_macs, find_branches


def test_dit_xl2_256_branch_macs_match_the_analytic_values():
    with torch.device("meta"):  # DiT-XL/2 config of facebook/DiT-XL-2-256; no weights allocated
        transformer = DiTTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            sample_size=32, patch_size=2,
        )  # fmt: skip

    def inputs(device: torch.device) -> dict:
        return {
            "hidden_states": torch.empty(1, 4, 32, 32, device=device),
            "timestep": torch.zeros(1, dtype=torch.long, device=device),
            "class_labels": torch.zeros(1, dtype=torch.long, device=device),
        }

    profile = count_macs(transformer, inputs)
    tokens, width = 256, 1152
    attention = 4 * tokens * width**2 + 2 * tokens**2 * width  # q, k, v, out projections + scores and values
    mlp = 2 * tokens * width * 4 * width
    assert len(profile.branch_macs) == 56 == len(find_branches(transformer))
    assert profile.branch_macs[0] == attention and profile.branch_macs[1] == mlp
    assert attention / 1e9 == pytest.approx(1.51, abs=0.01) and mlp / 1e9 == pytest.approx(2.72, abs=0.01)
    assert profile.branch_macs == (attention, mlp) * 28
    # always-run parts (patch embedding, adaLN, embeddings, final layer) are counted but small
    assert 0 < profile.always_run_macs < 0.05 * profile.transformer_macs


def test_reuse_lowers_generation_macs_in_proportion(digits):
    profile = digits.mac_profile(8, 8)
    n = len(profile.branch_macs)
    all_reused = [[False] * n, [True] * n]
    full = profile.generation_macs(None, 2, cfg=True)
    assert profile.generation_macs(all_reused, 2, cfg=True) == full - 2 * sum(profile.branch_macs)
