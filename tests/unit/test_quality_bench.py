"""The quality benchmark runs end to end on a tiny configuration and writes JSON and a plot."""

from __future__ import annotations

import json

import pytest

from harmonica_core.quality_bench import QualityBenchConfig, format_table, format_verdict, run_quality_bench, verdict


def test_quality_bench_smoke(tmp_path):
    config = QualityBenchConfig(
        steps=3, samples=10, fewer_steps=(2,), fora=(2,), forecast=((2, 1),), spread=(0.3,), delta=((2, 0.3),),
        betas={"iepo": (1e-4,), "ltc": (1e-2,), "l2c": (1e-2,)},
        iterations=4, batch_size=2, lambda_every=2, timing_batch=2, timing_repeats=1,
        targets=(1.5,), target_seeds=(0,), target_iterations=4, image_routers=((1.5, 0),), image_iterations=2,
    )  # fmt: skip
    result = run_quality_bench(config, tmp_path)
    names = [row["method"] for row in result["rows"]]
    assert names == [
        "none",
        "fewer steps T=2",
        "fora n=2",
        "fora n=2 forecast 1",
        "spread u=0.3 forecast 1",
        "delta n=2 u=0.3",
        "iepo beta=0.0001",
        "ltc beta=0.01",
        "l2c beta=0.01",
        "iepo target 1.5x seed 0",
        "image target 1.5x seed 0",
    ]
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["none"]["mse"] == 0 and rows["none"]["realized_speedup_cpu"] == 1
    assert rows["fewer steps T=2"]["theoretical_speedup"] == pytest.approx(1.5)
    assert rows["fora n=2"]["cache_usage_rate"] == pytest.approx(1 / 3) and rows["fora n=2"]["mse"] > 0
    forecast = rows["fora n=2 forecast 1"]
    assert forecast["group"] == "fora+forecast" and forecast["cache_usage_rate"] == rows["fora n=2"]["cache_usage_rate"]
    assert rows["spread u=0.3 forecast 1"]["cache_usage_rate"] == pytest.approx(1 / 3)  # 2 of 3 steps computed
    assert 0 < rows["delta n=2 u=0.3"]["cache_usage_rate"] <= 1 / 3 and rows["delta n=2 u=0.3"]["group"] == "delta"
    assert json.loads((tmp_path / "quality_digits_T3.json").read_text())["rows"] == json.loads(
        json.dumps(result["rows"])
    )
    assert (tmp_path / "quality_digits_T3.png").stat().st_size > 0
    assert len(list((tmp_path / "routers").glob("*.safetensors"))) == 5
    assert rows["iepo target 1.5x seed 0"]["group"] == "iepo target"
    assert rows["image target 1.5x seed 0"]["group"] == "image target"
    assert [entry["usage"] for entry in result["verdict"]] == [0.4, 0.5, 0.6]
    assert "| fora n=2 |" in format_table(result["rows"])


def _row(
    method: str, group: str, usage: float, psnr: float, half: float = 0.5, fidelity: float = 1.0, steps: int = 20
) -> dict:
    return {"method": method, "group": group, "steps": steps, "cache_usage_rate": usage, "psnr": psnr,
            "psnr_ci95": [psnr - half, psnr + half], "frechet_fidelity": fidelity}  # fmt: skip


def test_the_verdict_compares_the_best_learned_router_with_the_best_training_free_method_at_its_usage():
    rows = [
        _row("none", "none", 0.0, float("inf")),
        _row("fewer steps T=10", "fewer steps", 0.0, 25.0, steps=10),  # skips half the steps: usage 50 %
        _row("fora n=2", "fora", 0.5, 30.0),
        _row("fora n=3", "fora", 0.65, 26.0),
        _row("a", "iepo target", 0.41, 40.0),  # 40 %: beats fora n=2 (usage 50 % >= 37 %) by 10 dB
        _row("b", "iepo target", 0.52, 31.2, half=0.8),  # 50 %: +1.2 dB but the intervals overlap
        _row("c", "iepo", 0.50, 30.5),
        _row("d", "iepo target", 0.66, 30.0, fidelity=2.0),  # 60 %: none within 3 points (66 % is out)
    ]
    found = verdict(rows, steps=20)
    assert [(e["learned"], e["training_free"], e["holds"]) for e in found] == [
        ("a", "fora n=2", True),
        ("b", "fora n=2", False),
        (None, "fora n=3", False),
    ]
    assert found[0]["margin_db"] == pytest.approx(10) and found[1]["separated"] is False
    table = format_verdict(found, rows)
    row = "| 50% +-3% | b: 52.0%, 31.2 [30.4, 32.0] dB | fora n=2: 50.0%, 30.0 [29.5, 30.5] dB | +1.2 dB | no | no |"
    assert row in table
    assert "| 60% +-3% | none there |" in table
    # fewer steps counts as the share of steps it leaves out: T = 10 of 20 is a rival at 50 %
    stronger = [_row("fewer steps T=10", "fewer steps", 0.0, 31.0, steps=10), rows[5]]
    middle = verdict(stronger, steps=20)[1]
    assert (middle["training_free"], middle["training_free_usage"]) == ("fewer steps T=10", 0.5)
    assert "| fewer steps T=10: 50.0%, 31.0 [30.5, 31.5] dB |" in format_verdict([middle], stronger)
