"""Real services for the service tests: a Redis database, worker processes, the gateway in-process.

Redis: `REDIS_URL` if set, else the local server on a dedicated database index (flushed before and
after), else an embedded redis-server, as `make run` does on a fresh machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis
from fastapi.testclient import TestClient

from app.embedded_redis import EmbeddedRedis, answers, free_port
from app.settings import get_settings

TEST_DB = 11
ROOT = Path(__file__).resolve().parent.parent
# Short leases and limits so failure paths finish in seconds; the visibility timeout stays above them.
BASE_ENV = {
    "HARMONICA_LEASE_SECONDS": "2",
    "HARMONICA_MAX_STEPS": "1000",
    "HARMONICA_GEN_SOFT_TIME_LIMIT": "60",
    "HARMONICA_GEN_TIME_LIMIT": "70",
    "HARMONICA_TRAIN_SOFT_TIME_LIMIT": "120",
    "HARMONICA_TRAIN_TIME_LIMIT": "130",
    "HARMONICA_VISIBILITY_TIMEOUT": "140",
    "HARMONICA_RESTORE_INTERVAL": "1",
    "HARMONICA_WORKER_HEARTBEAT_SECONDS": "1",
    "HF_HUB_OFFLINE": "1",
}


@contextmanager
def redis_database(tmp: Path) -> Iterator[str]:
    embedded = None
    url = os.environ.get("REDIS_URL")
    if url is None:
        if answers("redis://127.0.0.1:6379/0"):
            url = f"redis://127.0.0.1:6379/{TEST_DB}"
        else:
            embedded = EmbeddedRedis(tmp / "redis").start()
            url = embedded.url
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        if embedded is not None:
            embedded.stop()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for this process (the in-process gateway reads its settings from them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


@contextmanager
def running_gateway(
    tmp: Path, headers: dict[str, str] | None = None, **settings: str
) -> Iterator[tuple[TestClient, dict[str, str], redis.Redis]]:
    """A test database, the service settings in the environment, and the gateway in-process."""
    with redis_database(tmp) as url:
        env = {**BASE_ENV, "REDIS_URL": url, "HARMONICA_ARTIFACTS_DIR": str(tmp / "artifacts"), **settings}
        with environment(env):
            from app.main import app

            with TestClient(app, headers=headers) as client:
                yield client, env, redis.Redis.from_url(url)


class Worker:
    """`python -m worker` as a real process group (Celery parent + prefork child)."""

    def __init__(self, env: dict[str, str], queues: str = "gen,train", name: str = "test") -> None:
        self.env = dict(os.environ, **env)
        self.queues, self.name = queues, f"{name}-{os.getpid()}-{time.monotonic_ns()}@localhost"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(env["HARMONICA_ARTIFACTS_DIR"]).parent / f"{self.name.split('@')[0]}.log"

    def start(self, client: redis.Redis, timeout: float = 90) -> Worker:
        command = [sys.executable, "-m", "worker", "--queues", self.queues, "--metrics-port", str(self.port),
                   "--name", self.name, "--loglevel", "info"]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=log,
                                            start_new_session=True)  # fmt: skip
        prefix = self.env.get("HARMONICA_KEY_PREFIX", "harmonica:")
        wait_until(lambda: client.exists(f"{prefix}worker:{self.name}"), timeout, f"worker start (log: {self.log})")
        wait_until(lambda: len(self.children()) > 0, timeout, "pool child")
        return self

    def children(self) -> list[psutil.Process]:
        assert self.process is not None
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return response.read().decode()

    def kill(self) -> None:
        """SIGKILL the whole group: parent and children die without any chance to clean up."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def imported_modules(*modules: str) -> set[str]:
    """Top-level packages a fresh interpreter has loaded after importing `modules`."""
    probe = (
        f"import json, sys, {', '.join(modules)}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, Any]:
    """A request to a service on a real port: (status, decoded JSON body), error statuses included."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
    processes: tuple[subprocess.Popen, ...] = (),
) -> Any:  # fmt: skip
    """condition()'s first truthy value (a refused connection counts as not yet); fails at the timeout,
    or at once if one of `processes` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"{process.args[:4]} exited ({process.returncode}) waiting for {what}"
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def poll_job(client: TestClient, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict:
    def check() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if until(job) else None

    return wait_until(check, timeout, f"job {job_id}", interval=0.05)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "canceled")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
