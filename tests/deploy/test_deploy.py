"""The production deployment (docker-compose.yml, docker/), checked by the real tools wherever they exist.

No Docker engine or Grafana server runs here or in CI, so what can be checked without them is checked with
the tools themselves: Debian's docker-compose 1.29 (`docker-compose config`) for both compose variants,
`promtool` for the Prometheus configuration, and a real Prometheus server that scrapes a running gateway and
worker and evaluates every query of the Grafana dashboard. `.ci/run` installs both Debian packages; a test
whose tool is missing is skipped and says which package brings it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from app.embedded_redis import free_port
from tests.servicekit import ROOT, Worker, http_json, imported_modules, redis_database, wait_until

DOCKER = ROOT / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_FILE = DOCKER / "compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
ALERTS = DOCKER / "prometheus-alerts.yml"
DATASOURCES = sorted((DOCKER / "grafana" / "provisioning" / "datasources").glob("*.yaml"))
DASHBOARD_PROVIDERS = sorted((DOCKER / "grafana" / "provisioning" / "dashboards").glob("*.yaml"))
DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "harmonica-prometheus"
DASHBOARD_UID = "harmonica-serve"
WORKER_ALIAS = "harmonica-workers"
GATEWAY_PORT, WORKER_METRICS_PORT = 8000, 9101

DOCKER_COMPOSE = shutil.which("docker-compose")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose not installed (Debian package docker-compose; .ci/run installs it)"
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)"
)


# ----------------------------------------------------------------------------------------------- helpers


def compose_config(*files: Path, env_file: Path, project_dir: Path = ROOT) -> dict[str, Any]:
    """`docker-compose config` of the given files, with only `env_file` as the source of ${...} values."""
    command = [DOCKER_COMPOSE, "--project-directory", str(project_dir), "--env-file", str(env_file)]
    for file in files:
        command += ["-f", str(file)]
    # A clean environment: a developer's own HARMONICA_* or COMPOSE_* variables must not change the result.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([*command, "config"], cwd=project_dir, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"docker-compose rejected {[f.name for f in files]}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def empty_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def gpu_stack(empty_env: Path) -> dict[str, Any]:
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/run installs it)")
    return compose_config(COMPOSE_FILE, env_file=empty_env)


@pytest.fixture(scope="module")
def cpu_stack(empty_env: Path) -> dict[str, Any]:
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/run installs it)")
    return compose_config(COMPOSE_FILE, CPU_FILE, env_file=empty_env)


def seconds(duration: str) -> float:
    """Compose durations as docker-compose prints them: 75s, 1m15s, 1m, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def worker_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in stack["services"].items() if "worker" in (svc.get("command") or [])}


def started_by_default(svc: dict[str, Any]) -> bool:
    return not svc.get("profiles")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # rows (collapsed rows keep their panels inside)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every query of every provisioned dashboard."""
    queries = []
    for path in DASHBOARDS:
        for panel in iter_panels(json.loads(path.read_text())["panels"]):
            for target in panel.get("targets", []):
                queries.append((path.name, panel["title"], target["expr"]))
    return queries


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                    "offset", "inf", "nan"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers (and Grafana's $model inside them)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if word.lower() in _PROMQL_KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


_METRIC_CLASS = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily|HistogramMetricFamily|"
    r"SummaryMetricFamily)\(\s*\"(\w+)\""
)


def exported_series() -> dict[str, str]:
    """Every series name the service's code exports -> the metric that defines it.

    Read from the sources: the definitions in app/contract/metrics.py, the gateway's scrape-time collector
    (GaugeMetricFamily in app/), and anything the workers define; with the suffixes prometheus-client
    adds (counters: _total; histograms: _bucket, _sum, _count).
    """
    series = {}
    for path in sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]):
        for kind, name in _METRIC_CLASS.findall(path.read_text()):
            if kind.startswith("Counter"):
                base = name.removesuffix("_total")
                names = [f"{base}_total", f"{base}_created"]
            elif kind.startswith(("Histogram", "Summary")):
                names = [name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"]
            else:
                names = [name]
            series.update(dict.fromkeys(names, name))
    return series


# ----------------------------------------------------------------------------------------------- compose


@needs_compose
def test_compose_gpu_stack(gpu_stack: dict[str, Any]) -> None:
    services = gpu_stack["services"]
    expected = {"redis", "minio", "minio-init", "api", "worker-gen", "worker-train", "prometheus", "grafana"}
    assert expected <= set(services)
    volumes = {"redis-data", "minio-data", "artifacts", "hf-cache", "prometheus-data", "grafana-data"}
    assert volumes <= set(gpu_stack["volumes"])

    redis = services["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in command
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "redis-data:/data:rw" in redis["volumes"]

    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.gateway"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "volumes" not in api  # its artifacts are in MinIO

    env = api["environment"]
    assert env["HARMONICA_ARTIFACT_STORE"] == "s3" and env["HARMONICA_S3_ENDPOINT_URL"] == "http://minio:9000"
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio:RELEASE.") and "ports" not in minio
    assert minio["command"] == ["server", "/data", "--console-address", ":9001"]
    assert "minio-data:/data:rw" in minio["volumes"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    root = (minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"])
    assert root == (env["HARMONICA_S3_ACCESS_KEY_ID"], env["HARMONICA_S3_SECRET_ACCESS_KEY"])  # the service's keys
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc:RELEASE.") and init["restart"] == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(init["command"])
    assert init["environment"]["BUCKET"] == env["HARMONICA_S3_BUCKET"]
    assert {init["environment"][k] for k in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")} == set(root)

    gpu = {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    for name, queue in (("worker-gen", "gen"), ("worker-train", "train")):
        worker = services[name]
        assert started_by_default(worker)
        assert worker["command"][-4:] == ["--queues", queue, "--metrics-port", str(WORKER_METRICS_PORT)]
        assert worker["deploy"]["resources"]["reservations"]["devices"] == [gpu]
        assert worker["environment"]["HARMONICA_DEVICE"] == "cuda"
    assert services["model-fetch"]["profiles"] == ["fetch"]  # on demand only
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


@needs_compose
@pytest.mark.parametrize("variant", ["gpu_stack", "cpu_stack"])
def test_compose_workers(variant: str, request: pytest.FixtureRequest) -> None:
    """What every worker service of either variant must have (serving.md 5.3-5.5)."""
    stack = request.getfixturevalue(variant)
    workers = worker_services(stack)
    assert workers
    for name, worker in workers.items():
        env = worker["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert env["HF_HOME"] == "/data/hf" and env["HF_HUB_OFFLINE"] == "1", name
        assert env["REMAP_SIGTERM"] == "SIGQUIT", name
        assert env["HARMONICA_ARTIFACTS_DIR"] == "/data/artifacts", name  # scratch, or the local store
        assert {"artifacts:/data/artifacts:rw", "hf-cache:/data/hf:rw"} <= set(worker["volumes"]), name
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy", name
        if env["HARMONICA_ARTIFACT_STORE"] == "s3":  # the bucket exists before a worker writes
            assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully", name
        assert seconds(worker["stop_grace_period"]) == 75, name
        health = " ".join(worker["healthcheck"]["test"])
        assert "celery" not in health and f":{WORKER_METRICS_PORT}/metrics" in health, name
        assert WORKER_ALIAS in worker["networks"]["default"]["aliases"], name  # how Prometheus finds it
        multiproc = env["PROMETHEUS_MULTIPROC_DIR"]
        assert any(multiproc.startswith(mount.split(":")[0] + "/") for mount in worker["tmpfs"]), name


@needs_compose
def test_compose_cpu_variant(gpu_stack: dict[str, Any], cpu_stack: dict[str, Any]) -> None:
    services = cpu_stack["services"]
    assert services["worker-gen"]["profiles"] == ["gpu"] and services["worker-train"]["profiles"] == ["gpu"]
    running = {name: svc for name, svc in worker_services(cpu_stack).items() if started_by_default(svc)}
    queues = {svc["command"][svc["command"].index("--queues") + 1] for svc in running.values()}
    assert queues == {"gen", "train"}
    gpu_env = gpu_stack["services"]["worker-gen"]["environment"]
    # The local folder instead of MinIO: no object store settings, and MinIO not started.
    object_store = {"HARMONICA_ARTIFACT_REDIRECT", "HARMONICA_PRESIGN_SECONDS"} | {
        key for key in gpu_env if key.startswith("HARMONICA_S3_")
    }
    local_env = {key: value for key, value in gpu_env.items() if key not in object_store}
    for name, worker in running.items():
        assert "deploy" not in worker, f"{name} reserves a GPU in the CPU variant"
        assert worker["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        # the CPU workers repeat the GPU workers' settings (anchors do not cross files): keep them in step
        assert worker["environment"] == {**local_env, "HARMONICA_DEVICE": "cpu", "HARMONICA_ARTIFACT_STORE": "local"}
        assert "artifacts:/data/artifacts:rw" in worker["volumes"], name
    api, gpu_api = services["api"], gpu_stack["services"]["api"]
    assert api["environment"] == {**gpu_api["environment"], "HARMONICA_ARTIFACT_STORE": "local"}
    assert api["volumes"] == ["artifacts:/data/artifacts:rw"]
    assert {k: v for k, v in api.items() if k != "volumes"} == {**gpu_api, "environment": api["environment"]}
    assert services["minio"]["profiles"] == services["minio-init"]["profiles"] == ["s3"]
    started = {name for name, svc in services.items() if started_by_default(svc)}
    for name in started:
        assert set(services[name].get("depends_on", {})) <= started, f"{name} depends on a service not started"
    for name in ("redis", "prometheus", "grafana"):  # unchanged (merging may reorder the volume lists)
        unordered = [{**s[name], "volumes": sorted(s[name]["volumes"])} for s in (services, gpu_stack["services"])]
        assert unordered[0] == unordered[1], name


@needs_compose
def test_compose_second_gpu_snippet(tmp_path: Path, empty_env: Path) -> None:
    """The commented example of a worker on GPU 1 is valid compose once uncommented."""
    lines = COMPOSE_FILE.read_text().splitlines()
    start, end = lines.index("  # >>> second GPU"), lines.index("  # <<< second GPU")
    snippet = [line.replace("  # ", "  ", 1) for line in lines[start + 1 : end]]
    edited = tmp_path / "docker-compose.yml"
    edited.write_text("\n".join([*lines[:start], *snippet, *lines[end + 1 :]]) + "\n")
    stack = compose_config(edited, env_file=empty_env)
    (name,) = set(stack["services"]) - set(compose_config(COMPOSE_FILE, env_file=empty_env)["services"])
    worker = stack["services"][name]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert worker["environment"] == stack["services"]["worker-gen"]["environment"]
    assert WORKER_ALIAS in worker["networks"]["default"]["aliases"]


@needs_compose
def test_env_example(gpu_stack: dict[str, Any]) -> None:
    """.env.example interpolates, documents exactly the ${VAR}s of the compose files, and passes the settings'
    own checks (the visibility timeout above every hard time limit)."""
    example = compose_config(COMPOSE_FILE, env_file=ENV_EXAMPLE)
    assert example["services"]["worker-gen"]["environment"] == gpu_stack["services"]["worker-gen"]["environment"]
    compose_config(COMPOSE_FILE, CPU_FILE, env_file=ENV_EXAMPLE)

    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    used = set()
    for path in (COMPOSE_FILE, CPU_FILE):
        text = re.sub(r"(?m)^\s*#.*$", "", path.read_text())  # comment lines
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert used - documented == set(), "compose variables missing from .env.example"
    assert documented - used - {"COMPOSE_FILE"} == set(), ".env.example variables that no compose file passes on"

    pytest.importorskip("pydantic_settings")
    from app.contract.settings import Settings

    values = dict(re.findall(r"^(HARMONICA_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    fields = {f"HARMONICA_{name.upper()}" for name in Settings.model_fields}
    assert set(values) - fields - {"HARMONICA_API_BIND", "HARMONICA_API_PORT", "HARMONICA_IMAGE_TAG"} == set()
    settings = Settings(
        _env_file=None, **{k.removeprefix("HARMONICA_").lower(): v for k, v in values.items() if k in fields}
    )
    assert settings.visibility_timeout > max(settings.gen_time_limit, settings.train_time_limit)


@needs_compose
def test_stop_grace_period_covers_soft_shutdown(gpu_stack: dict[str, Any]) -> None:
    pytest.importorskip("celery")
    from app.contract.queue import make_celery
    from app.contract.settings import Settings

    soft_shutdown = make_celery(Settings(_env_file=None)).conf.worker_soft_shutdown_timeout
    for name, worker in worker_services(gpu_stack).items():
        assert seconds(worker["stop_grace_period"]) >= soft_shutdown + 10, name


# ----------------------------------------------------------------------------------------------- images


def test_dockerfiles() -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"]
    for name in ("Dockerfile.gateway", "Dockerfile.worker"):
        path = DOCKER / name
        instructions = dockerfile_instructions(path)
        text = path.read_text()
        images = [args for op, args in instructions if op in {"FROM", "ARG"} and ("/" in args or ":" in args)]
        assert not [i for i in images if "nvidia/cuda" in i and "runtime" in i], "PyTorch wheels bundle CUDA"
        assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE), name
        final = stages(instructions)[-1]
        users = [args for op, args in final if op == "USER"]
        assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{name}: the final stage must not run as root"
        (cmd,) = [args for op, args in final if op == "CMD"]
        assert isinstance(json.loads(cmd), list), f"{name}: CMD must be exec form so signals reach the process"
        assert not [args for op, args in final if op == "ENTRYPOINT" and not args.startswith("[")], name
        build = stages(instructions)[0]
        copies = [(i, args.split()) for i, (op, args) in enumerate(build) if op == "COPY"]
        for _, parts in copies:
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{name}: COPY {source} is excluded by .dockerignore"
                )
        first_source = min(i for i, parts in copies if "harmonica_core" in parts)
        installs = [i for i, (op, args) in enumerate(build) if op == "RUN" and "pip install" in args and "-r " in args]
        assert installs and installs[0] < first_source, f"{name}: install dependencies before copying the source"

    worker = (DOCKER / "Dockerfile.worker").read_text()
    assert re.search(r"^ARG TORCH_INDEX_URL=", worker, re.MULTILINE)
    assert '--index-url "$TORCH_INDEX_URL"' in worker
    gateway = (DOCKER / "Dockerfile.gateway").read_text()
    assert "pip install --no-deps ." in gateway
    requirements = (DOCKER / "requirements-gateway.txt").read_text().lower()
    assert not re.search(r"^(torch|diffusers|transformers|numpy)\b", requirements, re.MULTILINE)


def _requirement_closure(lines: list[str]) -> set[str]:
    """Distributions that `pip install -r` of these lines brings (by this environment's metadata)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted = [Requirement(line) for line in lines]
    extras_seen: dict[str, set[str]] = {}
    while wanted:
        requirement = wanted.pop()
        name, extras = canonicalize_name(requirement.name), set(requirement.extras)
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen[name] = extras_seen.get(name, set()) | extras
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing here can import it either
        for line in requires:
            dependency = Requirement(line)
            active = {"", *extras_seen[name]}
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in active):
                wanted.append(dependency)
    return set(extras_seen)


# Imported only when installed, by packages that run without them (anyio tries sniffio, httpcore trio, httpx
# socks, redis cryptography, botocore certifi): the dev environment has them, as dependencies of selenium, moto
# and httpx, and the images need not. Their own dependencies come with them.
OPTIONAL_IMPORTS = ["sniffio", "trio", "PySocks", "cryptography", "certifi"]


def _not_installed_by(requirements: list[str], *modules: str) -> dict[str, list[str]]:
    """Packages that importing `modules` loads but `pip install` of `requirements` would not bring."""
    pytest.importorskip("packaging")
    from packaging.utils import canonicalize_name

    imported = sorted(imported_modules(*modules))
    allowed = _requirement_closure(requirements) | _requirement_closure(OPTIONAL_IMPORTS) | {"pip", "setuptools"}
    owners = importlib.metadata.packages_distributions()
    return {
        module: owners[module]
        for module in imported
        if module in owners and module not in {"app", "worker", "harmonica_core"}
        and not module.startswith("__editable__")
        and not {canonicalize_name(d) for d in owners[module]} & allowed
    }  # fmt: skip


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_ships_the_service() -> None:
    """Both images `pip install .`: the package must include the gateway and the worker, not just the library."""
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"].get("include", ["*"])
    for package in ("harmonica_core", "app", "worker"):
        assert any(fnmatch.fnmatch(package, pattern) for pattern in include), f"pyproject.toml does not ship {package}"


def _gateway_requirements() -> list[str]:
    lines = [line.split("#")[0].strip() for line in (DOCKER / "requirements-gateway.txt").read_text().splitlines()]
    return [line for line in lines if line]


def test_gateway_requirements_match_pyproject() -> None:
    """The gateway image pins its packages as pyproject.toml does (the worker image installs those)."""
    pytest.importorskip("packaging")
    from packaging.requirements import Requirement

    project = {Requirement(line).name.lower(): Requirement(line) for line in _pyproject()["project"]["dependencies"]}
    for line in _gateway_requirements():
        requirement = Requirement(line)
        assert requirement.name.lower() in project, f"{requirement.name} is not a dependency in pyproject.toml"
        assert str(requirement) == str(project[requirement.name.lower()]), f"{line} differs from pyproject.toml"


def test_gateway_imports_only_its_image_requirements() -> None:
    """The gateway image installs docker/requirements-gateway.txt only: `app.main` must need nothing else."""
    foreign = _not_installed_by(_gateway_requirements(), "app.main")
    assert not foreign, f"app.main imports packages the gateway image does not install: {foreign}"


def test_worker_imports_only_its_image_requirements() -> None:
    """The worker image installs torch plus pyproject's dependencies: the worker must need nothing else."""
    requirements = ["torch", *_pyproject()["project"]["dependencies"]]
    foreign = _not_installed_by(
        requirements,
        "worker.celery_app",
        "worker.tasks",
        "worker.runner",
        "worker.runners.generate",
        "worker.runners.train",
    )
    assert not foreign, f"the worker imports packages missing from pyproject's dependencies: {foreign}"


# ----------------------------------------------------------------------------------------------- prometheus


@needs_promtool
def test_promtool_check_config() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_compose
@pytest.mark.parametrize("variant", ["gpu_stack", "cpu_stack"])
def test_prometheus_scrapes_every_service(variant: str, request: pytest.FixtureRequest) -> None:
    stack = request.getfixturevalue(variant)
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    targets = {
        (name, sd["port"]) for job in jobs.values() for sd in job.get("dns_sd_configs", []) for name in sd["names"]
    }
    assert ("api", GATEWAY_PORT) in targets and ("harmonica-workers", WORKER_METRICS_PORT) in targets
    assert stack["services"]["api"]["ports"][0].endswith(f":{GATEWAY_PORT}/tcp")
    for name, worker in worker_services(stack).items():
        command = worker["command"]
        assert command[command.index("--metrics-port") + 1] == str(WORKER_METRICS_PORT), name
    prometheus = stack["services"]["prometheus"]
    assert any(v.endswith(":/etc/prometheus/prometheus.yml:ro") for v in prometheus["volumes"])
    assert any(v.endswith(":/etc/prometheus/prometheus-alerts.yml:ro") for v in prometheus["volumes"])


# ----------------------------------------------------------------------------------------------- grafana


def test_grafana_provisioning() -> None:
    (datasource_file,) = DATASOURCES
    (datasource,) = yaml.safe_load(datasource_file.read_text())["datasources"]
    assert datasource["uid"] == DATASOURCE_UID and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider_file,) = DASHBOARD_PROVIDERS
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./docker/grafana/dashboards:/etc/grafana/dashboards:ro" in mounts
    assert any(m.startswith("./docker/grafana/provisioning/datasources:") for m in mounts)
    assert any(m.startswith("./docker/grafana/provisioning/dashboards:") for m in mounts)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_provisionable(path: Path) -> None:
    text = path.read_text()
    dashboard = json.loads(text)
    assert "${" not in text, "unresolved ${...} placeholder: file provisioning cannot resolve it"
    assert "__inputs" not in dashboard and "__requires" not in dashboard
    assert dashboard["id"] is None and dashboard["uid"] == DASHBOARD_UID
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    queried = [panel for panel in panels if panel.get("targets")]
    assert len(queried) >= 20
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID
    # no two panels overlap on the 24-column grid
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_and_alerts_use_exported_metrics() -> None:
    """Every metric a query names is one the code exports, and the dashboard shows every exported metric."""
    exported = exported_series()
    assert "harmonica_queue_depth" in exported and "harmonica_branch_evaluations_total" in exported
    used = set()
    for file, title, expr in dashboard_queries():
        names = promql_metric_names(expr)
        assert names, f"{file} / {title}: no metric in {expr!r}"
        unknown = names - set(exported)
        assert not unknown, f"{file} / {title}: {sorted(unknown)} not exported by app/ or worker/"
        used |= {exported[name] for name in names}
    assert set(exported.values()) - used == set(), "exported metrics without a dashboard panel"
    for alert, expr in alert_queries():
        unknown = promql_metric_names(expr) - set(exported) - {"up"}  # `up`: Prometheus's own, per target
        assert not unknown, f"alert {alert}: {sorted(unknown)} not exported"


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(harmonica_e2e_latency_seconds_bucket{kind="generate", '
        'model=~"$model"}[$__rate_interval]))) / on() group_left sum(foo_total) or vector(0) > bool 1e3'
    )
    assert promql_metric_names(expr) == {"harmonica_e2e_latency_seconds_bucket", "foo_total"}


# ----------------------------------------------------------------------------------------------- integration
# A real Prometheus scrapes a real gateway and worker (digits model, CPU) after real jobs, then evaluates
# every dashboard query and alert rule through its HTTP API.

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s", "$model": ".*"}


@contextlib.contextmanager
def service(command: list[str], log: Path, env: dict[str, str], grace: float = 20) -> Iterator[subprocess.Popen]:
    """A subprocess in its own process group (pool children included); stopped, then killed, on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (pool children)
            process.wait(timeout=10)


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Gateway + one worker for both queues + Prometheus scraping both every second."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("deploy-stack")
    with redis_database(tmp) as url:
        yield from _stack(url, tmp)


def _stack(redis_url: str, tmp: Path) -> Iterator[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARMONICA_", "PROMETHEUS_MULTIPROC"))}
    env.update(REDIS_URL=redis_url, HARMONICA_ARTIFACTS_DIR=str(tmp / "artifacts"), HARMONICA_MODELS="digits",
               HARMONICA_DEVICE="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # fmt: skip
    worker = Worker(env)
    api_port, prometheus_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "harmonica-gateway", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
            {"job_name": "harmonica-workers", "static_configs": [{"targets": [f"127.0.0.1:{worker.port}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    gateway_cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(api_port)]
    prometheus_cmd = [
        PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]  # fmt: skip
    logs = {"gateway": tmp / "gateway.log", "worker": worker.log, "prometheus": tmp / "prometheus.log"}
    with (
        service(gateway_cmd, logs["gateway"], env) as gateway,
        service(prometheus_cmd, logs["prometheus"], env) as prometheus,
    ):
        processes = (gateway, prometheus)
        try:
            wait_until(lambda: http_json(f"{api}/healthz")[0] == 200, 60, "the gateway", processes=processes)
            worker.start(redis.Redis.from_url(redis_url))
            wait_until(lambda: http_json(f"{api}/readyz")[0] == 200, 60, "/readyz", processes=processes)
            prom = f"http://127.0.0.1:{prometheus_port}"
            wait_until(lambda: urllib.request.urlopen(f"{prom}/-/ready", timeout=2).status == 200, 60, "Prometheus")
        except AssertionError as error:
            raise AssertionError(
                f"{error}\n" + "\n".join(f"--- {n}:\n{log_tail(p)}" for n, p in logs.items())
            ) from None
        try:
            yield {"api": api, "prometheus": prom, "processes": processes, "logs": logs}
        finally:
            worker.stop()


def promql(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_json(url)
    assert status == 200 and body["status"] == "success", f"{expr}: {body.get('error') if body else status}"
    return body["data"]["result"]


def run_job(stack: dict[str, Any], path: str, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    status, job = http_json(stack["api"] + path, body)
    assert status == 202, f"POST {path}: {status} {job}"

    def finished() -> dict[str, Any] | None:
        record = http_json(f"{stack['api']}/jobs/{job['id']}")[1]
        return record if record["status"] in {"succeeded", "failed", "canceled"} else None

    try:
        record = wait_until(finished, timeout, f"job {job['id']} ({path})", processes=stack["processes"])
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- worker:\n{log_tail(stack['logs']['worker'])}") from None
    assert record["status"] == "succeeded", record
    return record


def test_every_dashboard_query_returns_data(stack: dict[str, Any]) -> None:
    prometheus = stack["prometheus"]
    routers = http_json(f"{stack['api']}/routers?model=digits")[1]
    router = next(
        r["id"] for r in routers if r["method"] == "harmonica" and r["scheduler"] == "ddim" and r["steps"] == 20
    )
    generate = {"model": "digits", "class_labels": [0, 1, 2], "num_images": 2, "steps": 20, "scheduler": "ddim"}
    none = dict(generate, seed=0, acceleration={"method": "none"})
    harmonica = dict(generate, seed=1, acceleration={"method": "harmonica", "router_id": router})
    train = {"model": "digits", "steps": 4, "iterations": 2, "batch_size": 2, "eval_samples": 4}

    # Counters and histograms appear with their first observation, which rate() cannot see: a second round
    # of jobs, after Prometheus has scraped the first, gives every rate() window a real increase.
    succeeded = 'sum(harmonica_jobs_completed_total{status="succeeded"})'
    for round_ in (1, 2):
        for body in (none, harmonica):
            run_job(stack, "/generate", dict(body, seed=body["seed"] + 10 * round_))
        run_job(stack, "/train-router", dict(train, seed=round_))
        # the worker's counters, as scraped (the gateway's share of the counter is only queued cancels)
        expected = f"{succeeded} >= {3 * round_}"
        wait_until(lambda q=expected: promql(prometheus, q), 30, f"a scrape of round {round_}")
        time.sleep(2)  # a couple more scrapes, so gauges and rate() windows all see the final state

    failures = []
    for file, title, expr in dashboard_queries():
        query = expr
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"{file} / {title}: unknown Grafana variable in {expr!r}"
        try:
            result = promql(prometheus, query)
        except AssertionError as error:
            failures.append(f"{title}: does not evaluate: {error}")
            continue
        if not result:
            failures.append(f"{title}: no data for {query}")
        elif all(math.isnan(float(r["value"][1])) for r in result):
            failures.append(f"{title}: only NaN for {query}")
    assert not failures, "\n".join(failures)

    # the dashboard's model variable finds the model
    status, body = http_json(f"{prometheus}/api/v1/label/model/values?match[]=harmonica_jobs_submitted_total")
    assert status == 200 and "digits" in body["data"]
    # every scrape target is up, and every alert rule evaluates without error
    targets = http_json(f"{prometheus}/api/v1/targets")[1]["data"]["activeTargets"]
    assert len(targets) == 2 and all(t["health"] == "up" for t in targets), targets
    rules = http_json(f"{prometheus}/api/v1/rules")[1]["data"]["groups"]
    evaluated = [rule for group in rules for rule in group["rules"]]
    assert len(evaluated) == len(alert_queries())
    assert all(rule["health"] == "ok" for rule in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
