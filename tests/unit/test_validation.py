"""One request validation for the CLI, the gateway's admission and the workers: same refusals, same fields."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from app.api.routes.generate import GenerateRequest, admit_generate
from app.api.routes.train import TrainRouterRequest, admit_training
from app.contract.artifacts import LocalStore
from app.contract.registry import RouterRegistry
from app.contract.settings import Settings
from harmonica_core.catalog import builtin_routers
from harmonica_core.cli import main
from harmonica_core.errors import InvalidRequest
from harmonica_core.validation import (
    Limits,
    RouterInfo,
    check_router,
    validate_generation,
    validate_training,
)

T20_ID = "builtin-digits-iepo-ddim-t20"
T20 = builtin_routers()[T20_ID]
DIT, PIXART = "facebook/DiT-XL-2-256", "PixArt-alpha/PixArt-XL-2-512x512"
SERVED = f"digits,{DIT},{PIXART}"


@pytest.fixture(autouse=True)
def no_limits_in_the_environment(monkeypatch):
    for f in fields(Limits):
        monkeypatch.delenv(f"HARMONICA_{f.name.upper()}", raising=False)


def Registry() -> RouterRegistry:
    """The real registry of an owner without trained routers: the built-in ones."""
    return RouterRegistry(LocalStore(Path("/nonexistent-artifacts")), "anonymous")


def generation(body: dict) -> dict:
    """An API body with the schema's defaults filled, as the gateway hands it to the core."""
    defaults = GenerateRequest().model_dump()
    return {**defaults, **body, "acceleration": {**defaults["acceleration"], **body.get("acceleration", {})}}


def api_field(admit, schema, body: dict, settings: Settings) -> str:
    """The field the gateway's 422 names: pydantic's (schema bounds) or admission's."""
    try:
        request = schema(**body)
    except ValidationError as error:
        return ".".join(str(part) for part in error.errors()[0]["loc"])
    with pytest.raises(InvalidRequest) as refused:
        admit(request, settings)
    return refused.value.field


def cli_refusal(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("harmonica: error: ") and err.count("\n") == 1, err
    return err.removeprefix("harmonica: error: ").strip()


GENERATION_CASES = [  # CLI arguments, API body, the field both name
    (["--prompt", "a three"], {"prompts": ["a three"]}, "prompts"),
    (["--guidance", "-3"], {"guidance": -3.0}, "guidance"),
    (["--method", "l2c", "--router", str(T20)], {"acceleration": {"method": "l2c", "router_id": T20_ID}},
     "acceleration.method"),
    (["--labels", "1", "--num-images", "100000", "--steps", "2"], {"class_labels": [1], "num_images": 100000,
     "steps": 2}, "num_images"),
    (["--num-images", "0"], {"num_images": 0}, "num_images"),
    (["--labels", "12"], {"class_labels": [12]}, "class_labels"),
    (["--height", "64"], {"height": 64}, "height"),
    (["--steps", "0"], {"steps": 0}, "steps"),
    (["--steps", "101"], {"steps": 101}, "steps"),
    (["--seed", "-1"], {"seed": -1}, "seed"),
    (["--threshold", "2"], {"acceleration": {"threshold": 2.0}}, "acceleration.threshold"),
    (["--method", "fora", "--interval", "0"], {"acceleration": {"method": "fora", "interval": 0}},
     "acceleration.interval"),
    (["--router", str(T20)], {"acceleration": {"router_id": T20_ID}}, "acceleration.router_id"),
    (["--method", "harmonica"], {"acceleration": {"method": "harmonica"}}, "acceleration.router_id"),
    (["--method", "harmonica", "--router", str(T20), "--steps", "10"],
     {"steps": 10, "acceleration": {"method": "harmonica", "router_id": T20_ID}}, "steps"),
    (["--method", "harmonica", "--router", str(T20), "--scheduler", "dpm-solver++"],
     {"scheduler": "dpm-solver++", "acceleration": {"method": "harmonica", "router_id": T20_ID}}, "scheduler"),
    (["--model", PIXART, "--labels", "1"], {"model": PIXART, "class_labels": [1]}, "prompts"),
    (["--model", PIXART, "--prompt", "x" * 1001], {"model": PIXART, "prompts": ["x" * 1001]}, "prompts"),
    (["--model", PIXART, "--prompt", "a cat", "--height", "520"], {"model": PIXART, "prompts": ["a cat"],
     "height": 520}, "height"),
    (["--model", PIXART, "--prompt", "a cat", "--width", "2048"], {"model": PIXART, "prompts": ["a cat"],
     "width": 2048}, "width"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "body", "field"), GENERATION_CASES)
def test_generation_is_refused_alike_by_core_cli_and_api(capsys, tmp_path, argv, body, field):
    router_id = body.get("acceleration", {}).get("router_id")
    router = RouterInfo.read(T20) if router_id else None
    with pytest.raises(InvalidRequest) as core:
        validate_generation(generation(body), Limits(), router)
    assert core.value.field == field
    assert cli_refusal(capsys, ["generate", *argv, "--out", str(tmp_path / "out")])
    settings = Settings(models=SERVED)
    assert api_field(lambda b, s: admit_generate(b, s, Registry()), GenerateRequest, body, settings) == field
    assert not (tmp_path / "out").exists()  # refused before any model loaded or wrote


TRAINING_CASES = [
    (["--iterations", "30000"], {"iterations": 30000}, "iterations"),
    (["--batch-size", "65"], {"batch_size": 65}, "batch_size"),
    (["--eval-samples", "501"], {"eval_samples": 501}, "eval_samples"),
    (["--steps", "1"], {"steps": 1}, "steps"),
    (["--steps", "101"], {"steps": 101}, "steps"),
    (["--tau", "1"], {"tau": 1.0}, "tau"),
    (["--lr", "0"], {"lr": 0.0}, "lr"),
    (["--beta", "2"], {"beta": 2.0}, "beta"),
    (["--lambda-every", "0"], {"lambda_every": 0}, "lambda_every"),
    (["--guidance", "0.5"], {"guidance": 0.5}, "guidance"),
    (["--model", DIT, "--objective", "l2c"], {"model": DIT, "objective": "l2c"}, "objective"),
    (["--forecast", "3"], {"forecast": 3}, "forecast"),
    (["--target-speedup", "1"], {"target_speedup": 1.0}, "target_speedup"),
    (["--objective", "l2c", "--target-speedup", "2"], {"objective": "l2c", "target_speedup": 2.0}, "target_speedup"),
    (["--target-speedup", "2", "--beta", "0"], {"target_speedup": 2.0, "beta": 0.0}, "beta"),
    (["--credit-steps", "0"], {"credit_steps": 0}, "credit_steps"),
    (["--steps", "4", "--credit-steps", "4"], {"steps": 4, "credit_steps": 4}, "credit_steps"),
    (["--objective", "l2c", "--credit-steps", "2"], {"objective": "l2c", "credit_steps": 2}, "credit_steps"),
    (["--objective", "image"], {"objective": "image"}, "target_speedup"),
    (
        ["--objective", "image", "--target-speedup", "2", "--credit-steps", "2"],
        {"objective": "image", "target_speedup": 2.0, "credit_steps": 2},
        "credit_steps",
    ),
]


@pytest.mark.parametrize(("argv", "body", "field"), TRAINING_CASES)
def test_training_is_refused_alike_by_core_cli_and_api(capsys, tmp_path, argv, body, field):
    with pytest.raises(InvalidRequest) as core:
        validate_training({**TrainRouterRequest().model_dump(), **body}, Limits())
    assert core.value.field == field
    assert cli_refusal(capsys, ["train-router", *argv, "--out", str(tmp_path / "r.safetensors")]) == str(core.value)
    assert api_field(admit_training, TrainRouterRequest, body, Settings(models=SERVED)) == field


def test_the_reported_defects_are_refused_with_a_clear_message(capsys, tmp_path):
    out = ["--out", str(tmp_path / "x")]
    refusals = {
        "digits is class-conditional": ["--model", "digits", "--prompt", "a three"],
        "guidance must be in [1, 30], got -3.0": ["--guidance", "-3"],
        "runs under method 'harmonica'": ["--method", "l2c", "--router", "builtin"],
        "the number of images in this job is 100000; at most 64 is allowed here": [
            "--labels", "1", "--num-images", "100000", "--steps", "2"
        ],
    }  # fmt: skip
    for words, argv in refusals.items():
        assert words in cli_refusal(capsys, ["generate", *argv, *out])


def test_limits_are_defined_once_and_read_from_the_same_environment(monkeypatch, capsys, tmp_path):
    for f in fields(Limits):
        assert Settings.model_fields[f.name].default == f.default
        assert Limits.setting(f.name)["ge"] == next(m.ge for m in Settings.model_fields[f.name].metadata)
    monkeypatch.setenv("HARMONICA_MAX_STEPS", "7")
    monkeypatch.setenv("harmonica_max_images_per_job", "3")  # pydantic-settings matches names case-insensitively
    assert Limits.from_env() == Limits.of(Settings()) == Limits(max_steps=7, max_images_per_job=3)
    message = cli_refusal(capsys, ["generate", "--steps", "8", "--out", str(tmp_path / "o")])
    with pytest.raises(InvalidRequest, match="at most 7") as api:
        admit_generate(GenerateRequest(steps=8), Settings(), Registry())
    assert message == str(api.value)
    assert "at most 3" in cli_refusal(
        capsys, ["generate", "--labels", "1,2", "--num-images", "2", "--steps", "2", "--out", "o"]
    )
    monkeypatch.setenv("HARMONICA_MAX_STEPS", "1")
    with pytest.raises(ValueError, match="HARMONICA_MAX_STEPS must be >= 2"):
        Limits.from_env()
    monkeypatch.setenv("HARMONICA_MAX_STEPS", "many")
    assert "HARMONICA_MAX_STEPS must be an integer" in cli_refusal(capsys, ["train-router", "--out", "r"])


def test_a_valid_request_is_normalized_and_the_input_left_alone():
    body = generation({"acceleration": {"method": "harmonica", "router_id": "builtin"}})
    request = validate_generation(body, Limits(), RouterInfo.read(T20))
    assert request["class_labels"] == list(range(10)) and request["acceleration"]["threshold"] == 0.1
    assert body["class_labels"] is None and body["acceleration"]["threshold"] is None
    pixart = generation({"model": PIXART, "prompts": ["a cat"], "height": 512, "width": 1024})
    assert validate_generation(pixart, Limits())["class_labels"] is None


def test_catalog_checks_skip_a_local_folder_whose_family_is_unknown_until_it_loads(tmp_path):
    folder = str(tmp_path)
    request = validate_generation(generation({"model": folder, "class_labels": [999], "height": 100}), Limits())
    assert request["class_labels"] == [999]  # checked by the model once loaded
    with pytest.raises(InvalidRequest, match="at most 1024"):  # operator limits still hold
        validate_generation(generation({"model": folder, "height": 2000}), Limits())
    trained_elsewhere = RouterInfo("r", "./other-spelling", "ddim", 20, "harmonica", 0.1)
    check_router(trained_elsewhere, folder, 20, "ddim", "harmonica")  # its fingerprint is checked at load
    with pytest.raises(InvalidRequest, match="trained for model 'digits'") as refused:
        check_router(RouterInfo.read(T20), DIT, 20, "ddim", "harmonica")
    assert refused.value.field == "model"


def test_train_router_l2c_beyond_digits_needs_data(capsys, tmp_path):
    request = {"model": DIT, "objective": "l2c", "steps": 10}
    assert validate_training(request, Limits(), data=True) == request
    assert "digits model only" in cli_refusal(capsys, ["bench", "quality", "--model", DIT, "--out", str(tmp_path)])


def test_the_worker_checks_a_stored_request_again_before_loading_a_model():
    from worker.runners.generate import run_batch
    from worker.runners.train import run as run_training

    def job(kind: str, request: dict) -> SimpleNamespace:
        return SimpleNamespace(id="0" * 32, kind=kind, owner="alice", model=request["model"], request=request)

    settings = Settings(max_images_per_job=4)
    (refused,) = run_batch([job("generate", generation({"class_labels": [1, 2, 3, 4, 5]}))], settings, [print])
    assert isinstance(refused, ValueError) and "at most 4" in str(refused)
    with pytest.raises(ValueError, match="iterations is 30000"):
        run_training(job("train_router", {**TrainRouterRequest().model_dump(), "iterations": 30000}), settings, print)
