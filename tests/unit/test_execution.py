"""Execution modes: the precomputed and compiled forwards equal diffusers' eager one, and compile once."""

from __future__ import annotations

import pytest
import torch

from harmonica_core import execution
from harmonica_core.cache.methods import fora_plan, make_plan, none_plan
from harmonica_core.cache.plan import CachePlan
from harmonica_core.catalog import builtin_routers
from harmonica_core.execution import MODES, PlannedForward, resolve_mode, variant_plan, warm_up
from harmonica_core.families import Conditioning
from harmonica_core.models import Model
from harmonica_core.router import load_router
from harmonica_core.sampling import GenerationRequest, generate

TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}


def _random_plan(steps: int, branches: int, seed: int = 0) -> CachePlan:
    """A router-like plan: about half the branches reused, a different choice at every step."""
    generator = torch.Generator().manual_seed(seed)
    rows = (torch.rand(steps, branches, generator=generator) < 0.5).tolist()
    return CachePlan.from_rows([[True] * branches, *rows[1:]])


@pytest.mark.parametrize("which", ["tiny_dit", "tiny_pixart", "tiny_pixart_with_sizes"])
@torch.no_grad()
def test_precomputed_blocks_equal_the_diffusers_forward_at_every_step(which, request):
    model = request.getfixturevalue(which)
    sized = which == "tiny_pixart_with_sizes"
    transformer, rows, steps = model.transformer, 4, 3
    generator = torch.Generator().manual_seed(0)
    if model.family == "dit":
        kwargs = {"class_labels": torch.tensor([1, 7, 1000, 1000])}
    else:
        mask = torch.ones(rows, 5, dtype=torch.long)
        mask[:, 3:] = 0  # padded text tokens are masked out
        text = torch.randn(rows, 5, 32, generator=generator)
        kwargs = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
        sizes = {"resolution": torch.tensor([[64.0, 48.0]] * rows), "aspect_ratio": torch.tensor([[4 / 3]] * rows)}
        kwargs["added_cond_kwargs"] = sizes if sized else {"resolution": None, "aspect_ratio": None}
    timesteps = torch.tensor([999, 500, 1])
    cond = Conditioning(kwargs, images=rows // 2, cfg=True, uncond_first=True, text_len=5, captions=[])
    planned = PlannedForward(model, none_plan(steps, len(model.branch_layout)), cond, timesteps, compiled=False)
    for k, t in enumerate(timesteps):
        x = torch.randn(rows, 4, 8, 6 if sized else 8, generator=generator)
        expected = transformer(x, timestep=t[None].expand(rows), return_dict=False, **kwargs)[0]
        torch.testing.assert_close(planned(x, k), expected, **TOLERANCE)
    assert planned.computed == steps * len(model.branch_layout) and planned.reused == 0


def test_a_reused_branch_runs_no_module_in_the_planned_forward(tiny_dit):
    runs = {"attn": 0, "mlp": 0}
    block = tiny_dit.transformer.transformer_blocks[0]
    block.attn1.to_q.register_forward_hook(lambda *_: runs.__setitem__("attn", runs["attn"] + 1))
    block.ff.net[0].register_forward_hook(lambda *_: runs.__setitem__("mlp", runs["mlp"] + 1))
    plan = CachePlan.from_rows([[True] * 4, [False, True, True, True], [True, False, True, True]])
    generate(tiny_dit, GenerationRequest(class_labels=[3], steps=3), plan, mode="precomputed")
    assert runs == {"attn": 2, "mlp": 2}


def _plans(model: Model, steps: int) -> dict[str, CachePlan]:
    n = len(model.branch_layout)
    return {"none": none_plan(steps, n), "fora": fora_plan(steps, n, 3), "router-like": _random_plan(steps, n)}


@pytest.mark.parametrize("mode", ["precomputed", "compiled"])
def test_every_mode_generates_the_eager_images_with_the_same_counts(mode, digits):
    short = GenerationRequest(class_labels=[3, 8], steps=10, guidance=1.5, seed=4)
    runs = [(short, plan) for plan in _plans(digits, 10).values()]
    router, _ = load_router(builtin_routers()["builtin-digits-iepo-ddim-t20"], digits.router_target("ddim", 20))
    plan = make_plan("harmonica", 20, digits.branch_layout, router)
    runs.append((GenerationRequest(class_labels=[3, 8], steps=20), plan))
    for request, plan in runs:
        eager = generate(digits, request, plan, mode="eager")
        other = generate(digits, request, plan, mode=mode)
        torch.testing.assert_close(other.images, eager.images, **TOLERANCE)
        assert (other.stats.computed, other.stats.reused) == (eager.stats.computed, eager.stats.reused)


@pytest.mark.parametrize("mode", ["precomputed", "compiled"])
def test_modes_agree_on_tiny_dit_and_pixart(mode, tiny_dit, tiny_pixart, prompt_embeddings):
    for model, fields in (
        (tiny_dit, {"class_labels": [1, 2]}),
        (tiny_pixart, {"prompt_embeddings": prompt_embeddings, "height": 8, "width": 8}),
    ):
        request = GenerationRequest(**fields, steps=6, guidance=4.5, seed=0)
        for name, plan in _plans(model, 6).items():
            eager = generate(model, request, plan, mode="eager")
            other = generate(model, request, plan, mode=mode)
            torch.testing.assert_close(other.images, eager.images, **TOLERANCE, msg=f"{model.name}, {mode}, {name}")


def test_after_warm_up_no_plan_or_batch_size_recompiles(digits):
    warm_up(digits, "compiled")
    n = len(digits.branch_layout)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for images, guidance, plan in (
            (3, 1.5, fora_plan(8, n, 2)),
            (2, 4.0, _random_plan(8, n, seed=1)),
            (1, 1.0, _random_plan(8, n, seed=2)),  # one row: the other specialization
        ):
            request = GenerationRequest(class_labels=list(range(images)), steps=8, guidance=guidance)
            generate(digits, request, plan, mode="compiled")


def test_the_variant_plan_walks_every_branch_pattern():
    plan = variant_plan(1, ["0.attn", "0.mlp", "1.attn", "1.mlp"])
    assert plan.compute[0] == (True,) * 4
    assert {row[:2] for row in plan.compute[1:]} == {(True, True), (True, False), (False, True), (False, False)}
    assert all(row[:2] == row[2:] for row in plan.compute)


def test_an_unknown_mode_is_refused_with_the_choices(digits):
    with pytest.raises(ValueError, match="precomputed"):
        generate(digits, GenerationRequest(class_labels=[1], steps=2), mode="fast")
    assert set(MODES) == {"auto", "eager", "precomputed", "compiled", "graphs"}


def test_auto_runs_the_fastest_measured_mode_of_the_device(digits, monkeypatch):
    result = generate(digits, GenerationRequest(class_labels=[1], steps=2))
    assert result.stats.mode == resolve_mode(digits, "auto") == "precomputed"  # on a CPU
    assert result.stats.as_dict()["execution_mode"] == "precomputed"
    monkeypatch.setattr(execution, "capturable", lambda model: True)
    assert resolve_mode(digits, "auto") == "graphs"  # where CUDA graphs can be captured
