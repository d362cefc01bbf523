"""Real services for the service tests: a Redis server, worker processes, the gateway in-process.

Redis: always a redis-server of the tests' own (the embedded one `make run` starts on a fresh machine)
on a free port with its data in the test's temporary folder, so the tests never touch a Redis they
did not start, whatever `REDIS_URL` says.

Time limits that are not under test stay at the service's defaults (minutes), so the suite holds on a
machine ten times slower than usual; the waits below are upper bounds, not expectations.
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

from app.contract.jobs import Job, JobStore, new_job_id, now
from app.contract.settings import get_settings
from app.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
# A short lease and reconcile interval so a dead worker's job comes back in seconds; one torch thread per
# worker process (two processes with two threads each on a 2-core machine run 10-70x slower).
BASE_ENV = {
    "HARMONICA_LEASE_SECONDS": "6",
    "HARMONICA_RECONCILE_INTERVAL": "1",
    "HARMONICA_MAX_STEPS": "1000",
    "HARMONICA_WORKER_HEARTBEAT_SECONDS": "1",
    "HF_HUB_OFFLINE": "1",
    "HARMONICA_TORCH_THREADS": "1",  # one torch thread per worker: tests run several on few cores
}
WAIT = 300  # seconds: the bound of any wait for a worker or a job (normally a few seconds)


@contextmanager
def redis_server(tmp: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, with append-only persistence under `tmp` (restartable in place)."""
    server = EmbeddedRedis(tmp / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def redis_database(tmp: Path) -> Iterator[str]:
    with redis_server(tmp) as server:
        yield server.url


@contextmanager
def s3_server(bucket: str = "harmonica") -> Iterator[dict[str, str]]:
    """An S3-compatible server of the test's own (moto's server mode, in a thread of this process) on a free
    loopback port, with `bucket` created; yields the service settings that point the artifact store at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "HARMONICA_ARTIFACT_STORE": "s3",
        "HARMONICA_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "HARMONICA_S3_BUCKET": bucket,
        "HARMONICA_S3_REGION": "us-east-1",
        "HARMONICA_S3_ACCESS_KEY_ID": "test-key",
        "HARMONICA_S3_SECRET_ACCESS_KEY": "test-secret",
    }
    try:
        s3_client(settings).create_bucket(Bucket=bucket)
        yield settings
    finally:
        server.stop()


def s3_client(settings: dict[str, str]) -> Any:
    """A boto3 client of the S3 server that `settings` name, to look at the bucket behind the service's back."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings["HARMONICA_S3_ENDPOINT_URL"],
        region_name=settings["HARMONICA_S3_REGION"],
        aws_access_key_id=settings["HARMONICA_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=settings["HARMONICA_S3_SECRET_ACCESS_KEY"],
    )


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
    """A redis-server of the test's own, the service settings in the environment, and the gateway in-process."""
    with redis_database(tmp) as url, gateway_on(url, tmp, headers, **settings) as stack:
        yield stack


@contextmanager
def gateway_on(
    url: str, tmp: Path, headers: dict[str, str] | None = None, **settings: str
) -> Iterator[tuple[TestClient, dict[str, str], redis.Redis]]:
    """The gateway in-process on the Redis at `url`, with the service settings in the environment."""
    env = {**BASE_ENV, "REDIS_URL": url, "HARMONICA_ARTIFACTS_DIR": str(tmp / "artifacts"), **settings}
    with environment(env):
        from app.main import app

        with TestClient(app, headers=headers) as client:
            yield client, env, redis.Redis.from_url(url)


@contextmanager
def gateway_process(
    tmp: Path, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], redis.Redis, dict[str, str]]]:
    """`uvicorn app.main:app` on a free port with its own Redis; yields its base URL, the process, Redis and the
    service settings (what a `Worker` for it needs)."""
    with redis_database(tmp) as url:
        port = free_port()
        env = {name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"}
        service = {**BASE_ENV, "REDIS_URL": url, "HARMONICA_ARTIFACTS_DIR": str(tmp / "artifacts"), **settings}
        env.update(service)
        base = f"http://127.0.0.1:{port}"
        with (tmp / "gateway.log").open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        client = redis.Redis.from_url(url)
        try:
            wait_until(lambda: http_json(f"{base}/healthz")[0] == 200, 120, "the gateway", processes=(process,))
            yield base, process, client, service
        finally:
            client.close()
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class Worker:
    """`python -m worker` as a real process group (Celery parent + prefork child)."""

    def __init__(self, env: dict[str, str], queues: str = "gen,train", name: str = "test") -> None:
        self.env = dict(os.environ, **env)
        self.queues, self.name = queues, f"{name}-{os.getpid()}-{time.monotonic_ns()}@localhost"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(env["HARMONICA_ARTIFACTS_DIR"]).parent / f"{self.name.split('@')[0]}.log"

    def start(self, client: redis.Redis, timeout: float = WAIT) -> Worker:
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


def queued_job(
    store: JobStore, kind: str = "generate", owner: str = "alice", batch: tuple[str, int] | None = None
) -> Job:
    """A job admitted into `store` as the gateway admits one (no message is sent); `batch`: (key, rows)."""
    job = Job(new_job_id(), kind, "queued", owner, "digits", {"steps": 2}, now())
    if batch is not None:
        job.batch_key, job.batch_rows = batch
    assert store.admit(job, max_active=1000, max_queued=1000) is None
    return job


def imported_modules(*modules: str) -> set[str]:
    """Top-level packages a fresh interpreter has loaded after importing `modules`."""
    return {name.split(".")[0] for name in loaded_modules(*modules)}


def loaded_modules(*modules: str) -> set[str]:
    """Every module a fresh interpreter has loaded after importing `modules`."""
    probe = f"import json, sys, {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
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


def poll_job(client: TestClient, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> dict:
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
