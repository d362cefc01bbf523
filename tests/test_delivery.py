"""At-least-once delivery with real kills: a job whose worker dies ends in one final state, once."""

from __future__ import annotations

import os
import signal

import pytest
from fastapi.testclient import TestClient

from tests.servicekit import Worker, finished, poll_job, running_gateway

JOB = {"class_labels": list(range(10)), "num_images": 1, "steps": 50}  # ~5 s on a 2-core CPU


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("delivery")
    with running_gateway(tmp) as (client, env, db):
        yield client, env, db, tmp / "artifacts"


def start_mid_job(client: TestClient) -> str:
    job_id = client.post("/generate", json=JOB).json()["id"]
    job = poll_job(client, job_id, lambda j: finished(j) or j["progress"].get("step", 0) > 0)
    assert job["status"] == "running", job
    return job_id


def serves_a_quick_job(client: TestClient) -> bool:
    job_id = client.post("/generate", json={"class_labels": [1], "steps": 5}).json()["id"]
    return poll_job(client, job_id, finished)["status"] == "succeeded"


def test_pool_child_killed_mid_job_is_redelivered_and_succeeds_once(stack):
    client, env, db, artifacts = stack
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
    # The job's message is unacked on the broker; a worker returns it after the visibility timeout.
    limits = {"VISIBILITY_TIMEOUT": 25, "GEN_SOFT_TIME_LIMIT": 20, "GEN_TIME_LIMIT": 22, "TRAIN_SOFT_TIME_LIMIT": 20,
              "TRAIN_TIME_LIMIT": 22}  # fmt: skip
    short = {**env, **{f"HARMONICA_{name}": str(value) for name, value in limits.items()}}
    second = Worker(short).start(db)
    try:
        job = poll_job(client, job_id, finished, timeout=90)
        assert job["status"] == "succeeded", job["error"]
        assert job["deliveries"] == 2
    finally:
        second.stop()


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
    worker = Worker({**env, "HARMONICA_GEN_SOFT_TIME_LIMIT": "1", "HARMONICA_GEN_TIME_LIMIT": "30"}).start(db)
    try:
        job = poll_job(client, client.post("/generate", json=JOB).json()["id"], finished)
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
        job = poll_job(client, job_id, finished, timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert "hard time limit" in job["error"]["message"]
        assert serves_a_quick_job(client)
    finally:
        worker.stop()
