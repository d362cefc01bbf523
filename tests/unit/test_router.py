"""Router thresholding and its file format; mismatched routers are refused with the field named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harmonica_core.cache.methods import l2c_plan, make_plan
from harmonica_core.router import (
    PINNED_LOGIT,
    Router,
    RouterMetadata,
    RouterMismatchError,
    RouterTarget,
    load_router,
    read_router,
    save_router,
)


def test_router_plan_pins_row_zero_and_thresholds():
    router = Router(4, 3, generator=torch.Generator().manual_seed(0))
    router.load_(torch.tensor([[0.0, 0.0, 0.0]] + [[-4.0, 0.0, 4.0]] * 3))
    plan = router.plan(threshold=0.1)
    assert plan.compute[0] == (True, True, True)
    assert plan.compute[1] == (False, True, True)  # sigmoid(-4) = 0.018 < 0.1 < sigmoid(0)
    assert plan.cache_usage_rate == pytest.approx(3 / 12)
    assert l2c_plan(router).compute[2] == (True, True, True)  # odd steps (1st, 3rd) run in full
    assert l2c_plan(router).compute[1] == (False, True, True)
    router().sum().backward()
    assert len(router.rows) == 3 and all(row.grad.gt(0).all() for row in router.rows)  # row 0 is no parameter
    router.load_(router.logits.detach() * 10)
    router.clamp_()
    assert router.logits.abs().max() <= 5 and torch.all(router.logits[0] == PINNED_LOGIT)


def test_round_trip_and_refusal_of_mismatched_settings(digits, tmp_path):
    target = digits.router_target("ddim", 10)
    router = Router(10, len(digits.branch_layout), generator=torch.Generator().manual_seed(3))
    path = save_router(tmp_path / "r.safetensors", router, RouterMetadata(target, 0.2, "digits", {"beta": 1e-7}))
    loaded, metadata = load_router(path, target)
    assert torch.equal(loaded.logits, router.logits)
    assert metadata.threshold == 0.2 and metadata.training == {"beta": 1e-7} and metadata.target == target
    assert make_plan("harmonica", 10, digits.branch_layout, loaded) == router.plan(0.1)

    learned = Router(10, len(digits.branch_layout), forecast=1)  # forecast weights travel in the file
    with torch.no_grad():
        learned.forecast_weights.uniform_()
    path_learned = save_router(tmp_path / "f.safetensors", learned, RouterMetadata(target))
    again, _ = load_router(path_learned, target)
    assert torch.equal(again.forecast_weights, learned.forecast_weights) and again.plan(0.1) == learned.plan(0.1)

    with pytest.raises(RouterMismatchError, match=r"'steps'.*10.*20") as error:
        load_router(path, digits.router_target("ddim", 20))
    assert error.value.field == "steps"
    with pytest.raises(RouterMismatchError) as error:
        load_router(path, digits.router_target("dpm-solver++", 10))
    assert error.value.field == "scheduler_class"
    other_model = dataclasses.replace(target, model_fingerprint="0123456789abcdef")
    with pytest.raises(RouterMismatchError) as error:
        load_router(path, other_model)
    assert error.value.field == "model_fingerprint"


def test_unreadable_router_files_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no router file"):
        read_router(tmp_path / "missing.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a HarmoniCa router"):
        read_router(tmp_path / "plain.safetensors")
    target = RouterTarget("DiT", "0" * 16, ["0.attn", "0.mlp"], "DDIMScheduler", {}, 4, [750, 500, 250, 0])
    path = save_router(tmp_path / "r.safetensors", Router(4, 2), RouterMetadata(target))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    for shape in [(5,), (4, 2, 1, 2), (3, 2, 1)]:  # forecast weights of another shape than [T, N, order]
        save_file(tensors | {"forecast_weights": torch.ones(shape)}, str(path), metadata)
        with pytest.raises(ValueError, match="4 x 2 x the forecast order"):
            read_router(path)


def test_methods_that_need_a_router_say_so():
    with pytest.raises(ValueError, match="needs a router"):
        make_plan("harmonica", 10, ["0.attn", "0.mlp"])
    with pytest.raises(ValueError, match="unknown method"):
        make_plan("teacache", 10, ["0.attn", "0.mlp"])
    assert make_plan("fora", 5, ["0.attn", "0.mlp"], interval=2).compute == ((True, True), (False, False)) * 2 + (
        (True, True),
    )


def test_fingerprint_follows_the_weights_not_the_folder(digits, tmp_path):
    import shutil

    from harmonica_core.digits.model import WEIGHTS_DIR, load_digits

    shutil.copytree(WEIGHTS_DIR, tmp_path / "weights")
    moved = load_digits(tmp_path / "weights")
    assert moved.fingerprint == digits.fingerprint
    with torch.no_grad():
        moved.transformer.transformer_blocks[0].ff.net[2].weight.view(-1)[0] += 1
    del moved.__dict__["fingerprint"]
    assert moved.fingerprint != digits.fingerprint
