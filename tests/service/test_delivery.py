"""At-least-once delivery with real kills: a job whose worker or Redis dies ends in one final state, once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.contract.jobs import JobStore
from tests.servicekit import Worker, finished, gateway_on, poll_job, redis_server

JOB = {"class_labels": list(range(10)), "num_images": 1, "steps": 50}  # ~5 s on a 2-core CPU


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("delivery")
    with redis_server(tmp) as server, gateway_on(server.url, tmp) as (client, env, db):
        yield client, env, db, server


def start_mid_job(client: TestClient) -> str:
    job_id = client.post("/generate", json=JOB).json()["id"]
    job = poll_job(client, job_id, lambda j: finished(j) or j["progress"].get("step", 0) > 0)
    assert job["status"] == "running", job
    return job_id


def serves_a_quick_job(client: TestClient) -> bool:
    job_id = client.post("/generate", json={"class_labels": [1], "steps": 5}).json()["id"]
    return poll_job(client, job_id, finished)["status"] == "succeeded"


def test_pool_child_killed_mid_job_is_redelivered_and_succeeds_once(stack):
    client, env, db, _ = stack
    artifacts = Path(env["HARMONICA_ARTIFACTS_DIR"])
    worker = Worker(env).start(db)
    try:
        job_id = start_mid_job(client)
        os.kill(worker.children()[0].pid, signal.SIGKILL)
        job = poll_job(client, job_id, finished)
        assert job["status"] == "succeeded", job["error"]
        assert job["deliveries"] == 2
        files = sorted(p.name for p in (artifacts / "jobs" / job_id).iterdir())
        assert files == [f"{n:03d}.png" for n in range(10)] + ["grid.png"]  # one set, no half-written leftovers
        assert len(job["links"]["images"]) == 10
    finally:
        worker.stop()


def test_whole_worker_killed_mid_job_finishes_on_the_next_worker(stack):
    client, env, db, _ = stack
    first = Worker(env).start(db)
    try:
        job_id = start_mid_job(client)
    finally:
        first.kill()  # SIGKILL to parent and child: no chance to hand the job back
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
    # The message stays unacked for the 7 h visibility timeout; the reconciler gives the job to the next worker
    # once its lease (6 s here) has expired, whatever that timeout.
    second = Worker(env).start(db)
    try:
        ready = time.monotonic()
        job = poll_job(client, job_id, finished)
        assert time.monotonic() - ready < 120, "the reconciler should bring the job back within two minutes"
        assert job["status"] == "succeeded", job["error"]
        assert job["deliveries"] == 2
    finally:
        second.stop()


def test_a_redis_restart_mid_job_neither_strands_the_job_nor_its_key_slot(stack):
    client, env, db, server = stack
    worker = Worker(env).start(db)
    try:
        job_id = start_mid_job(client)
        time.sleep(1.5)  # the append-only file syncs every second: the record is on disk, as in production
        server.kill()  # kill -9: connections reset, unsynced writes lost
        time.sleep(3)
        server.start()
        back = time.monotonic()
        job = poll_job(client, job_id, finished)
        assert time.monotonic() - back < 60, "the job should end within a minute of Redis returning"
        assert job["status"] == "succeeded" or job["error"]["code"], job
        assert JobStore(db).active("anonymous") == 0  # its key's slot is free again
        assert serves_a_quick_job(client)
    finally:
        worker.stop()


def test_a_job_that_keeps_killing_its_worker_fails_instead_of_looping(stack):
    client, env, db, _ = stack
    worker = Worker({**env, "HARMONICA_MAX_DELIVERIES": "1"}).start(db)
    try:
        job_id = start_mid_job(client)
        os.kill(worker.children()[0].pid, signal.SIGKILL)
        job = poll_job(client, job_id, finished)
        assert job["status"] == "failed" and job["error"]["code"] == "redelivery_limit"
        assert "delivered 2 times" in job["error"]["message"]
    finally:
        worker.stop()


def test_a_job_past_its_soft_time_limit_fails_with_timeout_and_the_worker_serves_on(stack):
    client, env, db, _ = stack
    worker = Worker({**env, "HARMONICA_GEN_SOFT_TIME_LIMIT": "2", "HARMONICA_GEN_TIME_LIMIT": "600"}).start(db)
    try:
        job_id = start_mid_job(client)
        child = worker.children()[0].pid
        os.kill(child, signal.SIGSTOP)  # blocked on purpose: it cannot end before its limit, however fast
        time.sleep(4)
        os.kill(child, signal.SIGCONT)  # the soft limit's signal is waiting for it
        job = poll_job(client, job_id, finished)
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert serves_a_quick_job(client)
    finally:
        worker.stop()


def test_a_job_hung_past_its_hard_time_limit_fails_and_the_worker_serves_on(stack):
    client, env, db, _ = stack
    limits = {"HARMONICA_GEN_SOFT_TIME_LIMIT": "3", "HARMONICA_GEN_TIME_LIMIT": "5"}
    worker = Worker({**env, **limits}).start(db)
    try:
        job_id = start_mid_job(client)
        os.kill(worker.children()[0].pid, signal.SIGSTOP)  # hung: not even the soft limit can run in it
        job = poll_job(client, job_id, finished)
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert "hard time limit" in job["error"]["message"]
        assert serves_a_quick_job(client)
    finally:
        worker.stop()
