"""The quality benchmark runs end to end on a tiny configuration and writes JSON and a plot."""

from __future__ import annotations

import json

import pytest

from harmonica_core.quality_bench import QualityBenchConfig, format_table, run_quality_bench


def test_quality_bench_smoke(tmp_path):
    config = QualityBenchConfig(
        steps=3, samples=10, fewer_steps=(2,), fora=(2,), forecast=((2, 1),), delta=((2, 0.3),),
        betas={"iepo": (1e-4,), "ltc": (1e-2,), "l2c": (1e-2,)},
        iterations=4, batch_size=2, lambda_every=2, timing_batch=2, timing_repeats=1,
    )  # fmt: skip
    result = run_quality_bench(config, tmp_path)
    names = [row["method"] for row in result["rows"]]
    assert names == [
        "none",
        "fewer steps T=2",
        "fora n=2",
        "fora n=2 forecast 1",
        "delta n=2 u=0.3",
        "iepo beta=0.0001",
        "ltc beta=0.01",
        "l2c beta=0.01",
    ]
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["none"]["mse"] == 0 and rows["none"]["realized_speedup_cpu"] == 1
    assert rows["fewer steps T=2"]["theoretical_speedup"] == pytest.approx(1.5)
    assert rows["fora n=2"]["cache_usage_rate"] == pytest.approx(1 / 3) and rows["fora n=2"]["mse"] > 0
    forecast = rows["fora n=2 forecast 1"]
    assert forecast["group"] == "fora+forecast" and forecast["cache_usage_rate"] == rows["fora n=2"]["cache_usage_rate"]
    assert 0 < rows["delta n=2 u=0.3"]["cache_usage_rate"] <= 1 / 3 and rows["delta n=2 u=0.3"]["group"] == "delta"
    assert json.loads((tmp_path / "quality_digits_T3.json").read_text())["rows"] == json.loads(
        json.dumps(result["rows"])
    )
    assert (tmp_path / "quality_digits_T3.png").stat().st_size > 0
    assert len(list((tmp_path / "routers").glob("*.safetensors"))) == 3
    assert "| fora n=2 |" in format_table(result["rows"])
