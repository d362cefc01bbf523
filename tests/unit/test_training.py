"""Router training (SDT + IEPO / LTC, and L2C) on the digits model and a tiny PixArt pipeline."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from harmonica_core.cache.hooks import CacheState
from harmonica_core.catalog import builtin_routers
from harmonica_core.cli import main
from harmonica_core.digits.data import digits_split
from harmonica_core.router import PINNED_LOGIT, Router, read_router
from harmonica_core.train_config import TrainConfig
from harmonica_core.training import (
    TrainData,
    TrainingCancelled,
    TrainProgress,
    plan_speedups,
    spread_logits,
    train_router,
)


def small(**overrides) -> TrainConfig:
    return TrainConfig(**({"steps": 4, "iterations": 12, "batch_size": 2, "lr": 0.1, "lambda_every": 6} | overrides))


def test_only_the_router_learns_and_its_invariants_hold(digits, monkeypatch):
    before = {k: v.clone() for k, v in digits.transformer.state_dict().items()}
    starts: list[bool] = []  # at each trajectory's first step: was the cache empty?
    original = CacheState.begin_step

    def spy(self, shape):
        if self.step == -1 and not self.bypass:
            starts.append(all(self.config.reuse.recall(i, 0) is None for i in range(len(self.branches))))
        original(self, shape)

    monkeypatch.setattr(CacheState, "begin_step", spy)
    router = train_router(digits, small(beta=1e-4))
    assert all(p.grad is None for p in digits.transformer.parameters())
    assert all(torch.equal(before[k], v) for k, v in digits.transformer.state_dict().items())
    assert any(row.grad is not None for row in router.rows)
    assert torch.all(router.logits[0] == PINNED_LOGIT)
    assert router.logits.abs().max() <= 5
    # 4 SDT trajectories of 3 updates, plus 4 sampling passes per lambda refresh (2 refreshes)
    assert len(starts) == 4 + 2 * 4 and all(starts)


def test_credit_steps_update_once_per_window_and_reach_the_rows_that_refreshed_the_cache(digits, monkeypatch):
    grads: list[torch.Tensor] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # the gradient each row takes into the step, [T, N] (none: zeros)
        rows = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]]
        grads.append(torch.cat([torch.zeros_like(rows[0])[None], torch.stack(rows)]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train_router(digits, small(steps=5, iterations=2, credit_steps=3, beta=0.0, objective="ltc"))
    # steps 1-3 share the first update, step 4 makes the second: one trajectory
    assert len(grads) == 2
    assert grads[0][1:4].abs().sum(dim=1).gt(0).all() and grads[0][4].abs().sum() == 0
    assert grads[1][:4].abs().sum() == 0 and grads[1][4].abs().sum() > 0
    windowed = grads[0][1]
    grads.clear()
    train_router(digits, small(steps=5, iterations=1, beta=0.0, objective="ltc"))  # the paper's: step 1 alone
    assert grads[0][2:].abs().sum() == 0
    # same batch and start: what row 1 got beyond step 1's own error came from steps 2-3 reading what it refreshed
    assert not torch.allclose(windowed, grads[0][1])


def test_each_row_keeps_its_own_optimizer_state_and_rests_between_its_updates(digits, monkeypatch):
    rows: list[torch.Tensor] = []
    original = Router.clamp_

    def spy(self):  # after each optimizer step
        original(self)
        rows.append(self.logits.detach().clone())

    monkeypatch.setattr(Router, "clamp_", spy)
    router = train_router(digits, small(iterations=2, optimizer_state="rows"))
    assert len(rows) == 2
    # update 1 trains step 1's row, update 2 step 2's: row 1 does not drift on its momentum (as under the
    # default "table" state), row 3 never moved
    start = Router(4, len(digits.branch_layout), generator=torch.Generator().manual_seed(0)).logits
    assert not torch.equal(rows[0][1], start[1]) and torch.equal(rows[1][1], rows[0][1])
    assert not torch.equal(rows[1][2], rows[0][2]) and torch.equal(router.logits[3], start[3])
    rows.clear()
    train_router(digits, small(iterations=2))
    assert not torch.equal(rows[1][1], rows[0][1])  # the table: row 1 moves again on its momentum


def test_the_image_objective_starts_from_the_spread_plan_and_trains_every_step_at_the_target(digits, monkeypatch):
    config = small(objective="image", steps=20, target_speedup=2.0, forecast=1)
    start = spread_logits(digits, config, torch.Generator().manual_seed(0))
    assert [bool(row[0] > 0) for row in start] == [k % 2 == 0 for k in range(20)]  # FORA n = 2 at 2x
    assert all(len({bool(v > 0) for v in row}) == 1 for row in start)

    grads: list[dict[tuple[int, ...], torch.Tensor]] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        params = self.param_groups[0]["params"]
        grads.append({p.shape: torch.stack([q.grad.clone() for q in params if q.shape == p.shape]) for p in params})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    log: list[TrainProgress] = []
    config = small(objective="image", steps=6, iterations=2, target_speedup=1.5, forecast=1)
    router = train_router(digits, config, on_progress=log.append)
    # one update per trajectory, and the final image's error reaches every trained row
    rows, weights = grads[0][(len(digits.branch_layout),)], grads[0][(6, len(digits.branch_layout), 1)][0]
    assert len(grads) == 2 and rows.abs().sum(dim=1).gt(0).all()
    # ... and the forecast's weights, which act from step 2 on (a reuse at step 1 has one computed output: a copy)
    assert weights[2:].abs().sum() > 0 and weights[:2].abs().sum() == 0
    # the plan trained is the one closest to the target
    reachable = plan_speedups(digits, config)
    probs = router().detach()
    closest = min({reachable(probs, t) for t in probs[1:].flatten().tolist()}, key=lambda s: abs(s - 1.5))
    assert abs(log[-1].theoretical_speedup - 1.5) <= abs(closest - 1.5) + 0.2
    assert all(p.loss > 0 for p in log)  # the error of a cached final image


def test_lambdas_are_reproducible_vary_by_batch_and_leave_global_rng_alone(digits):
    runs = []
    for _ in range(2):
        state = torch.get_rng_state()
        log: list[TrainProgress] = []
        train_router(digits, small(), on_progress=log.append)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append([p.lambdas for p in log if p.phase == "updates"])
    assert runs[0] == runs[1]
    first, second = runs[0][0], runs[0][-1]  # refreshed on different batches
    assert first != second and first[0] == 0 and all(v > 0 for v in first[1:])


def test_progress_reports_the_lambda_passes_before_the_updates_they_precede(digits):
    log: list[TrainProgress] = []
    train_router(digits, small(), on_progress=log.append)  # T = 4, 12 updates, lambdas refreshed every 6
    passes = [("lambdas", updates, k) for updates in (0, 6) for k in range(1, 5)]
    expected = (
        passes[:4] + [("updates", i, 0) for i in range(1, 7)] + passes[4:] + [("updates", i, 0) for i in range(7, 13)]
    )
    assert [(p.phase, p.iteration, p.lambda_pass) for p in log] == expected
    first = {"phase": "lambdas", "iteration": 0, "total": 12, "loss": None, "lambda_pass": 1, "lambda_passes": 4}
    plan = {"cache_usage_rate": log[0].cache_usage_rate, "theoretical_speedup": log[0].theoretical_speedup}
    assert log[0].as_dict() == first | plan | {"beta": 1e-6}
    assert log[10].loss == log[9].loss  # a refresh's passes carry the last update's loss
    keys = {"phase", "iteration", "total", "loss", "cache_usage_rate", "theoretical_speedup", "beta"}
    assert set(log[-1].as_dict()) == keys


def test_a_target_speedup_moves_beta_towards_it(digits):
    for target, beta in ((3.0, 1e-6), (1.01, 1.0)):  # far below the target at the start; far above it soon
        log: list[TrainProgress] = []
        config = small(objective="ltc", beta=beta, target_speedup=target, lr=1.0)
        train_router(digits, config, on_progress=log.append)
        updates = [p for p in log if p.phase == "updates"]
        rises = []
        for before, after in zip([beta, *(p.beta for p in updates)], updates, strict=False):
            rises.append(after.beta > before)
            assert rises[-1] == (after.theoretical_speedup < target)  # more reuse pressure while below, less above
        assert all(rises) if target == 3.0 else not all(rises)


def test_a_target_speedup_lands_by_the_threshold_read_off_the_router(digits):
    import math

    from harmonica_core.router import Router
    from harmonica_core.training import plan_speedups, threshold_for

    router, config = Router(8, len(digits.branch_layout), torch.Generator().manual_seed(0)), small(steps=8)
    probs, speedup = router().detach(), plan_speedups(digits, config)
    assert threshold_for(digits, router, config) == config.tau  # no target: the training threshold
    for target in (1.5, 2.0, 3.0):
        chosen = threshold_for(digits, router, replace(config, target_speedup=target))
        off = [abs(math.log(speedup(probs, t) / target)) for t in probs[1:].flatten().tolist()]
        assert abs(math.log(speedup(probs, chosen) / target)) == min(off) < 0.05


def test_gain_lambdas_price_each_step_by_its_image_error_per_unit_of_step_error(digits):
    logs = {}
    for mode in ("cumulative", "gain"):
        log: list[TrainProgress] = []
        train_router(digits, small(lambda_mode=mode, iterations=3), on_progress=log.append)
        logs[mode] = log[-1].lambdas
    cumulative, gain = logs["cumulative"], logs["gain"]
    assert gain[0] == 0 and all(g > 0 for g in gain[1:])
    # The same passes: lambda_k(gain) = lambda_k(cumulative) / MSE of step k's own eps change, which is smallest at
    # the early, noisy steps: against the paper's proxy, gain weighs early steps up and late ones down.
    ratios = [g / c for g, c in zip(gain[1:], cumulative[1:], strict=True)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 10 * ratios[-1]


def test_a_router_trained_with_forecast_records_it_and_generation_defaults_to_it(digits, tmp_path):
    from app.api.routes.generate import GenerateRequest
    from harmonica_core.validation import Limits, RouterInfo, validate_generation

    router = tmp_path / "router.safetensors"
    args = "--steps 4 --iterations 3 --batch-size 2 --beta 1e-4 --forecast 1 --eval-samples 4"
    assert main(["train-router", *args.split(), "--out", str(router)]) == 0
    _, metadata = read_router(router)
    assert metadata.training["forecast"] == 1
    accel = {"method": "harmonica", "router_id": "r"}
    request = GenerateRequest(steps=4, acceleration=accel).model_dump()
    assert request["acceleration"]["forecast"] is None  # not given: the router's own
    assert validate_generation(request, Limits(), RouterInfo.read(router))["acceleration"]["forecast"] == 1
    given = GenerateRequest(steps=4, acceleration=accel | {"forecast": 0}).model_dump()
    assert validate_generation(given, Limits(), RouterInfo.read(router))["acceleration"]["forecast"] == 0


def test_larger_beta_gives_more_reuse_and_training_lowers_the_loss(digits):
    rates = {}
    for beta in (0.0, 1e-3):
        log: list[TrainProgress] = []
        train_router(digits, small(objective="ltc", beta=beta, iterations=30), on_progress=log.append)
        rates[beta] = log[-1].cache_usage_rate
        if beta == 0.0:
            per_trajectory = [sum(p.loss for p in log[i : i + 3]) for i in range(0, 30, 3)]
            assert per_trajectory[-1] < per_trajectory[0]
    assert rates[1e-3] > rates[0.0]


@pytest.mark.parametrize(
    "overrides", [{}, {"objective": "image", "target_speedup": 1.5, "forecast": 2}], ids=["iepo", "image-forecast"]
)
def test_resume_after_interruption_matches_an_uninterrupted_run(digits, tmp_path, overrides):
    config = small(iterations=9, **overrides)
    reference = train_router(digits, config)

    def stop_midway(progress: TrainProgress) -> None:
        if progress.iteration == 5:  # inside the second trajectory
            raise TrainingCancelled

    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingCancelled):
        train_router(digits, config, on_progress=stop_midway, checkpoint=checkpoint)
    resumed = train_router(digits, config, checkpoint=checkpoint)
    assert torch.equal(resumed.logits, reference.logits)
    if overrides:  # the forecast's learned weights resume too, and moved off their first-order start
        assert torch.equal(resumed.forecast_weights, reference.forecast_weights)
        assert not torch.equal(
            resumed.forecast_weights, Router(4, len(digits.branch_layout), forecast=2).forecast_weights
        )
    with pytest.raises(ValueError, match="another training config"):
        train_router(digits, small(iterations=10), checkpoint=checkpoint)


def test_l2c_trains_from_real_digits(digits):
    images, labels, _, _ = digits_split()
    log: list[TrainProgress] = []
    router = train_router(digits, small(objective="l2c"), TrainData(samples=images, labels=labels), log.append)
    assert len(log) == 12 and torch.all(router.logits[0] == PINNED_LOGIT)
    with pytest.raises(ValueError, match="real data"):
        train_router(digits, small(objective="l2c"))


def test_pixart_training_with_precomputed_embeddings(tiny_pixart, prompt_embeddings):
    data = TrainData(prompt_embeddings=prompt_embeddings)
    log: list[TrainProgress] = []
    router = train_router(tiny_pixart, small(guidance=3.0), data, log.append)
    updates = [p for p in log if p.phase == "updates"]
    assert router.logits.shape == (4, len(tiny_pixart.branch_layout)) and len(updates) == 12


def test_cli_router_is_accepted_by_generate_and_refused_for_other_steps(tmp_path, capsys):
    router = tmp_path / "router.safetensors"
    args = "--model digits --steps 4 --iterations 6 --batch-size 2 --lr 0.1 --beta 1e-4 --lambda-every 3"
    code = main(["train-router", *args.split(), "--eval-samples", "10", "--out", str(router)])
    assert code == 0
    _, metadata = read_router(router)
    assert metadata.training["objective"] == "iepo" and metadata.training["iterations"] == 6
    assert {"cache_usage_rate", "theoretical_speedup", "psnr", "accuracy"} <= set(metadata.quality)
    out = tmp_path / "images"
    assert main(["generate", "--method", "harmonica", "--router", str(router), "--steps", "4", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "harmonica"
    capsys.readouterr()
    assert main(["generate", "--method", "harmonica", "--router", str(router), "--steps", "5", "--out", str(out)]) == 2
    assert "was trained for steps 4, not 5" in capsys.readouterr().err  # refused before the model loads


@pytest.mark.parametrize("router_id", sorted(builtin_routers()))
def test_builtin_routers_ship_for_digits_and_meet_their_metadata(digits, router_id):
    from harmonica_core.router import load_router

    _, header = read_router(builtin_routers()[router_id])
    router, metadata = load_router(builtin_routers()[router_id], digits.router_target("ddim", header.target.steps))
    assert router.plan(metadata.threshold).cache_usage_rate == pytest.approx(metadata.quality["cache_usage_rate"])
    assert metadata.quality["samples"] >= 200 and metadata.quality["cache_usage_rate"] > 0.2
    objective, target = metadata.training["objective"], metadata.training.get("target_speedup")
    assert router_id.startswith(f"builtin-digits-{objective}-ddim-t{header.target.steps}")
    if objective == "image":  # aimed at the speedup its id names, and landed within 5 % of it
        assert router_id.endswith("-x" + f"{target:g}".replace(".", "p"))
        assert metadata.quality["theoretical_speedup"] == pytest.approx(target, rel=0.05)


def test_builtin_routers_are_named_by_id_and_builtin_is_the_2x_image_router(tmp_path, capsys):
    from harmonica_core.cli import builtin_router

    assert builtin_router("digits", "ddim", 20, "builtin") == builtin_routers()["builtin-digits-image-ddim-t20-x2"]
    args = ["generate", "--method", "harmonica", "--steps", "10", "--num-images", "2", "--out", str(tmp_path)]
    assert main([*args, "--router", "builtin-digits-image-ddim-t10-x2p5"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "harmonica"
    assert main([*args, "--router", "builtin-digits-magic"]) == 2
    refusal = "no built-in router for digits named builtin-digits-magic (built in: builtin-digits-"
    assert refusal in capsys.readouterr().err
    assert main([*args, "--router", "builtin", "--steps", "7"]) == 2
    assert "no built-in router for digits with ddim at 7 steps (built in: builtin-digits-" in capsys.readouterr().err
