"""The branch cache's hooks (the eager mode) against diffusers itself and against a hand-written reuse reference."""

from __future__ import annotations

import pytest
import torch

from harmonica_core.cache.hooks import CacheConfig, CacheError, apply_branch_cache, remove_branch_cache
from harmonica_core.cache.methods import fora_plan, none_plan
from harmonica_core.cache.plan import CachePlan
from harmonica_core.sampling import GenerationRequest, generate


def _assert_pristine(transformer: torch.nn.Module) -> None:
    for module in transformer.modules():
        assert not hasattr(module, "_diffusers_hook")
        assert "forward" not in module.__dict__
    assert not hasattr(transformer, "_harmonica_cache")


def test_compute_all_plan_reproduces_the_dit_pipeline_exactly(tiny_dit):
    pipe = tiny_dit.pipeline
    reference = pipe(
        class_labels=[1, 2], guidance_scale=1.5, generator=torch.manual_seed(0), num_inference_steps=3,
        output_type="pt",
    ).images  # fmt: skip
    ours = generate(tiny_dit, GenerationRequest(class_labels=[1, 2], steps=3, guidance=1.5, seed=0), mode="eager")
    assert torch.equal(ours.images, reference.float())
    assert ours.stats.computed == 3 * len(tiny_dit.branch_layout) and ours.stats.reused == 0
    _assert_pristine(tiny_dit.transformer)


def test_compute_all_plan_reproduces_the_pixart_pipeline_exactly(tiny_pixart, prompt_embeddings):
    pe = prompt_embeddings
    reference = tiny_pixart.pipeline(
        prompt=None, negative_prompt=None, prompt_embeds=pe.embeds, prompt_attention_mask=pe.mask,
        negative_prompt_embeds=pe.negative_embeds, negative_prompt_attention_mask=pe.negative_mask,
        use_resolution_binning=False, height=8, width=8, guidance_scale=4.5, num_inference_steps=3,
        generator=torch.manual_seed(0), output_type="pt",
    ).images  # fmt: skip
    request = GenerationRequest(prompt_embeddings=pe, steps=3, guidance=4.5, seed=0, height=8, width=8)
    ours = generate(tiny_pixart, request, mode="eager")
    assert torch.equal(ours.images, reference.float())
    assert tiny_pixart.branch_layout[:3] == ["0.attn", "0.cross_attn", "0.mlp"]
    _assert_pristine(tiny_pixart.transformer)


def _count_module_runs(transformer: torch.nn.Module) -> dict[str, int]:
    """Count real executions of each branch through a submodule that only runs when the branch computes."""
    counts: dict[str, int] = {}
    for index, block in enumerate(transformer.transformer_blocks):
        for kind, inner in (("attn", block.attn1.to_q), ("mlp", block.ff.net[0])):
            name = f"{index}.{kind}"
            counts[name] = 0
            inner.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_reuse_skips_modules_and_matches_a_hand_written_reference(tiny_dit):
    # step 0 computes everything; step 1 reuses block 0's attention and block 1's MLP
    plan = CachePlan.from_rows([[True, True, True, True], [False, True, True, False]])
    request = GenerationRequest(class_labels=[3, 4], steps=2, guidance=1.5, seed=7)
    counts = _count_module_runs(tiny_dit.transformer)
    cached = generate(tiny_dit, request, plan, mode="eager")
    assert counts == {"0.attn": 1, "0.mlp": 2, "1.attn": 2, "1.mlp": 1}
    assert (cached.stats.computed, cached.stats.reused) == (6, 2)
    assert cached.stats.cache_usage_rate == pytest.approx(2 / 8)

    # reference: plain torch forward hooks that store step-0 outputs and substitute them at step 1
    blocks = tiny_dit.transformer.transformer_blocks
    targets = {"0.attn": blocks[0].attn1, "1.mlp": blocks[1].ff}
    store: dict[str, torch.Tensor] = {}
    calls = {"n": 0}
    handles = [tiny_dit.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))]
    for name, module in targets.items():

        def substitute(_module, _inputs, output, name=name):
            if calls["n"] == 1:
                store[name] = output
                return output
            return store[name]

        handles.append(module.register_forward_hook(substitute))
    reference = generate(tiny_dit, request, mode="eager")
    for handle in handles:
        handle.remove()
    assert torch.equal(cached.images, reference.images)
    uncached = generate(tiny_dit, request, mode="eager")
    assert not torch.equal(cached.images, uncached.images)


def test_fora_plan_counts_and_theoretical_speedup(digits):
    steps, n = 6, len(digits.branch_layout)
    result = generate(digits, GenerationRequest(class_labels=[0, 1], steps=steps), fora_plan(steps, n, 3))
    assert result.stats.reused == 4 * n  # steps 1, 2, 4, 5 reuse everything
    assert result.stats.cache_usage_rate == pytest.approx(4 / 6)
    profile = digits.mac_profile(8, 8)
    full = steps * profile.transformer_macs
    cached = full - 4 * sum(profile.branch_macs)
    assert result.stats.theoretical_speedup == pytest.approx(full / cached)
    assert 1 < result.stats.theoretical_speedup < 3


def test_batch_shape_change_invalidates_the_cache(digits):
    n = len(digits.branch_layout)
    state = apply_branch_cache(digits.transformer, CacheConfig(plan=CachePlan.from_rows([[False] * n] * 2)))
    try:
        labels = torch.tensor([1, 2])
        for batch in (2, 1):  # second call: new batch shape, reuse impossible, so it computes
            x = torch.randn(batch, 1, 8, 8)
            digits.transformer(x, timestep=torch.tensor([500] * batch), class_labels=labels[:batch])
        assert (state.computed, state.reused) == (2 * n, 0)
    finally:
        remove_branch_cache(digits.transformer)


def test_refuses_chunked_feed_forward_wrong_plans_and_double_attach(tiny_dit):
    transformer = tiny_dit.transformer
    n = len(tiny_dit.branch_layout)
    with pytest.raises(CacheError, match="branches"):
        apply_branch_cache(transformer, CacheConfig(plan=none_plan(2, n + 1)))
    transformer.transformer_blocks[1].set_chunk_feed_forward(2)
    with pytest.raises(CacheError, match="chunked feed-forward"):
        apply_branch_cache(transformer, CacheConfig(plan=none_plan(2, n)))
    transformer.transformer_blocks[1].set_chunk_feed_forward(None)
    apply_branch_cache(transformer, CacheConfig(plan=none_plan(2, n)))
    with pytest.raises(CacheError, match="already attached"):
        apply_branch_cache(transformer, CacheConfig(plan=none_plan(2, n)))
    remove_branch_cache(transformer)
    _assert_pristine(transformer)
    with pytest.raises(ValueError, match="plan is 2 steps"):
        generate(tiny_dit, GenerationRequest(class_labels=[1], steps=3), none_plan(2, n))
    _assert_pristine(transformer)
