"""`harmonica generate` end to end on digits, and clear refusals with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from harmonica_core.cli import main


def test_generate_writes_images_and_a_summary(tmp_path):
    out = tmp_path / "out"
    code = main(["generate", "--model", "digits", "--method", "fora", "--interval", "2", "--steps", "6",
                 "--labels", "0,1,2", "--num-images", "2", "--seed", "0", "--out", str(out)])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fora" and summary["steps"] == 6 and len(summary["images"]) == 6
    assert summary["cache_usage_rate"] == pytest.approx(0.5)
    assert summary["theoretical_speedup"] > 1.5 and summary["latency_s"] > 0
    assert summary["captions"] == ["0", "0", "1", "1", "2", "2"]
    assert Image.open(out / summary["images"][0]).size == (8, 8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "teacache"], "invalid choice"),
        (["--labels", "1,x"], "comma-separated integers"),
        (["--labels", "12"], "class labels must be in [0, 9]"),
        (["--method", "harmonica"], "needs --router"),
        (["--method", "harmonica", "--router", "missing.safetensors"], "no router file"),
        (["--steps", "0"], "must be >= 1"),
        (["--threshold", "2"], "must be in [0, 1]"),
        (["--prompt", "a three"], "digits is class-conditional"),
        (["--labels", "1", "--num-images", "100000"], "at most 64 is allowed here"),
        (["--model", "facebook/DiT-XL-2-256"], "hf download"),
        (["--device", "banana"], "unknown device 'banana'"),
    ],
)
def test_bad_arguments_exit_2_with_one_message(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    process = subprocess.run(
        [sys.executable, "-m", "harmonica_core.cli", "generate", "--steps", "2", "--out", "o", *args],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert message in process.stderr
    assert "Traceback" not in process.stderr


def test_bench_quality_runs_only_the_groups_asked_for():
    from harmonica_core.cli import only_groups
    from harmonica_core.quality_bench import QualityBenchConfig

    config = only_groups(QualityBenchConfig(), "fora, delta")
    assert config.fora and config.delta and config.fewer_steps == () and config.betas == {} and config.targets == ()
    assert only_groups(QualityBenchConfig(), "target").targets == QualityBenchConfig().targets
    assert config.image_routers == () and only_groups(QualityBenchConfig(), "image").image_routers
    assert config.spread == () and only_groups(QualityBenchConfig(), "spread").spread == QualityBenchConfig().spread
    assert main(["bench", "quality", "--only", "magic", "--out", "unused"]) == 2


def test_measure_router_records_a_new_measurement_and_keeps_the_logits(tmp_path, capsys):
    import shutil

    from harmonica_core.catalog import builtin_routers
    from harmonica_core.router import read_router

    path = tmp_path / "router.safetensors"
    shutil.copy(builtin_routers()["builtin-digits-iepo-ddim-t10"], path)
    before, old = read_router(path)
    assert main(["measure-router", "--router", str(path), "--samples", "10", "--write"]) == 0
    after, new = read_router(path)
    assert torch.equal(before.logits, after.logits) and new.plan == old.plan and new.training == old.training
    assert new.quality["samples"] == 10 and new.quality["command"].endswith("--samples 10 --write")
    assert new.quality["cache_usage_rate"] == pytest.approx(old.quality["cache_usage_rate"])
    assert "over 10 samples; recorded in" in capsys.readouterr().out
