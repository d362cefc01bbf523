"""Module boundaries that keep the service safe: what each process imports, and API key handling."""

from __future__ import annotations

import ast
import json
from importlib import import_module

import pytest

from app.api.keys import digest, identify, load_keys, main
from app.contract.settings import Settings
from tests.servicekit import ROOT, imported_modules, loaded_modules

CONTRACT = [f"app.contract.{path.stem}" for path in sorted((ROOT / "app" / "contract").glob("[!_]*.py"))]


def imports_of(path) -> set[str]:
    """Every module a source file imports, at any depth (imports inside functions too), relative ones resolved."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            found.add(".".join(part for part in (base, node.module) if part))
    return found


def test_gateway_and_worker_parent_never_import_torch():
    # The gateway stays light; the Celery parent forks pool children and must not touch CUDA first.
    assert "torch" not in imported_modules("app.main")
    assert "torch" not in imported_modules("worker.celery_app", "worker.tasks")


def test_workers_import_only_the_contract_from_app():
    # The gateway's code (app.api) can change without touching a worker; the contract never reaches back into it.
    for path in sorted((ROOT / "worker").glob("*.py")):
        foreign = {name for name in imports_of(path) if name.split(".")[0] == "app"}
        foreign -= {name for name in foreign if name == "app.logs" or name.startswith("app.contract")}
        assert not foreign, f"{path.name} imports {sorted(foreign)}"
    loaded = loaded_modules("worker.__main__", "worker.celery_app", "worker.tasks", "worker.runner", *CONTRACT)
    assert not {name for name in loaded if name.startswith(("app.api", "app.main", "fastapi"))}


def test_every_job_kind_has_a_task_a_route_time_limits_and_a_runner():
    from app.contract.kinds import KINDS, QUEUES
    from app.contract.queue import make_celery
    from app.main import app
    from worker.runner import runner_for
    from worker.tasks import TASKS

    settings = Settings()
    conf = make_celery(settings).conf
    assert set(KINDS) == set(TASKS)
    paths = app.openapi()["paths"]
    for kind in KINDS.values():
        assert TASKS[kind.name].name == kind.task and conf.task_routes[kind.task] == {"queue": kind.queue}
        assert kind.queue in QUEUES
        assert getattr(settings, kind.soft_limit) == kind.soft_seconds < getattr(settings, kind.hard_limit)
        assert conf.task_annotations[kind.task] == kind.time_limits(settings)
        posts = [route.path for route in import_module(f"app.api.routes.{kind.route}").router.routes]
        assert posts and all("post" in paths[path] for path in posts)
        runner = runner_for(kind)
        assert callable(runner.run_batch) and issubclass(runner.cancelled, Exception)


def test_request_validation_is_torch_free():
    # The gateway validates with it, and the CLI refuses a bad request before the heavy imports.
    assert not {"torch", "diffusers", "pydantic"} & imported_modules("harmonica_core.validation")


def test_model_families_are_torch_free():
    # validation reads each family's admission rules; the runtime parts import torch where they run.
    assert not {"torch", "diffusers"} & imported_modules("harmonica_core.families")


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


def test_pool_processes_share_the_cores_as_torch_threads(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    assert Settings().threads_per_process(concurrency=1) == 8
    assert Settings().threads_per_process(concurrency=4) == 2
    assert Settings().threads_per_process(concurrency=16) == 1  # never zero threads
    assert Settings(torch_threads=3).threads_per_process(concurrency=4) == 3  # an explicit setting wins
