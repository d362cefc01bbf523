"""Module boundaries that keep the service safe: what each process imports, and API key handling."""

from __future__ import annotations

import json

import pytest

from app.keys import digest, identify, load_keys, main
from app.settings import Settings
from tests.servicekit import imported_modules


def test_gateway_and_worker_parent_never_import_torch():
    # The gateway stays light; the Celery parent forks pool children and must not touch CUDA first.
    assert "torch" not in imported_modules("app.main")
    assert "torch" not in imported_modules("worker.celery_app", "worker.tasks")


def test_request_validation_is_torch_free():
    # The gateway validates with it, and the CLI refuses a bad request before the heavy imports.
    assert not {"torch", "diffusers", "pydantic"} & imported_modules("harmonica_core.validation")


def test_the_library_imports_neither_the_gateway_nor_the_workers():
    modules = imported_modules("harmonica_core.cli", "harmonica_core.training", "harmonica_core.quality_bench")
    assert not {"app", "worker", "fastapi", "celery"} & modules


def test_api_keys_come_hashed_from_the_environment_and_a_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nbob:{digest('hk_bob')}\n\n")
    keys = load_keys(Settings(api_keys=f"alice:{digest('hk_alice')}", api_keys_file=keys_file))
    assert identify(keys, "hk_alice") == "alice" and identify(keys, "hk_bob") == "bob"
    assert identify(keys, "hk_mallory") is None and "hk_alice" not in json.dumps(keys)
    with pytest.raises(ValueError, match="name:<64 hex sha256>"):
        load_keys(Settings(api_keys="alice:plaintext-key"))


def test_key_generator_prints_a_key_and_its_hashed_entry(capsys):
    assert main(["carol"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    assert lines[1].endswith(f"carol:{digest(key)}")
    assert main(["bad name!"]) == 2


def test_inconsistent_time_limits_are_refused_at_start():
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        Settings(visibility_timeout=100, gen_time_limit=360)
    with pytest.raises(ValueError, match="SOFT_TIME_LIMIT must be below"):
        Settings(gen_soft_time_limit=400, gen_time_limit=360)
