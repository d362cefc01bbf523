"""`make run` as a user runs it: starts, serves a generation, stops on Ctrl-C; and the embedded Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import psutil
import redis

from app import run
from app.embedded_redis import EmbeddedRedis, free_port
from tests.servicekit import ROOT, http_json, redis_database, wait_until


def test_make_run_serves_a_generation_and_stops_on_ctrl_c(tmp_path):
    with redis_database(tmp_path) as url:
        port = free_port()
        env = dict(os.environ, REDIS_URL=url, PORT=str(port), HARMONICA_ARTIFACTS_DIR=str(tmp_path / "artifacts"))
        log = tmp_path / "make-run.log"
        with log.open("wb") as out:
            make = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        try:
            wait_until(lambda: b"ready. OpenAPI docs" in log.read_bytes() or make.poll() is not None, 180, "ready")
            text = log.read_text()
            assert f"http://127.0.0.1:{port}/docs" in text and "curl -s -X POST" in text, text
            assert "open to anyone" in text  # no keys: it says so
            assert "/readyz" not in text  # the launcher's readiness polls leave no access lines to bury this
            family = [make.pid] + [p.pid for p in psutil.Process(make.pid).children(recursive=True)]
            base = f"http://127.0.0.1:{port}"
            status, body = http_json(f"{base}/generate", {"class_labels": [4], "steps": 10})
            job_id = body["id"]
            assert status == 202
            job = wait_until(
                lambda: (j := http_json(f"{base}/jobs/{job_id}")[1])["status"] == "succeeded" and j, 60, "job"
            )
            with urllib.request.urlopen(f"{base}{job['links']['images'][0]}", timeout=10) as png:
                assert png.read().startswith(b"\x89PNG")
        finally:
            os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            make.wait(timeout=120)
        assert "stopped" in log.read_text()
        wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                                   for pid in family), 10, "every process to exit")  # fmt: skip


def test_embedded_redis_when_none_is_configured_or_on_localhost(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(run, "LOCAL_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    url, embedded = run.choose_redis(tmp_path / "redis")
    try:
        assert isinstance(embedded, EmbeddedRedis) and url == embedded.url
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v" and client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        embedded.stop()
    assert embedded.process is None
    time.sleep(0.1)
    assert not run.answers(url)
