"""Cross-request batching with a real worker: compatible jobs share one denoising batch and each stays itself."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

from harmonica_core.cache.methods import make_plan
from harmonica_core.models import load_model
from harmonica_core.sampling import GenerationRequest, generate
from tests.servicekit import Worker, finished, gateway_on, poll_job, redis_server

FORA = {"method": "fora", "interval": 2}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    with redis_server(tmp) as server, gateway_on(server.url, tmp) as (client, env, db):
        yield client, env, db


def submit_all(client, bodies: list[dict]) -> list[str]:
    ids = []
    for body in bodies:
        response = client.post("/generate", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def test_compatible_jobs_share_a_batch_and_each_gets_the_images_it_gets_alone(stack):
    client, env, db = stack
    compatible = [
        {"class_labels": [1], "steps": 10, "seed": 11, "acceleration": FORA},
        {"class_labels": [2, 5], "num_images": 2, "steps": 10, "seed": 22, "acceleration": FORA},
        {"class_labels": [7], "steps": 10, "seed": 33, "acceleration": FORA},
    ]
    other = {"class_labels": [4], "steps": 8, "seed": 44, "acceleration": FORA}  # other steps: never with them
    ids = submit_all(client, [*compatible, other])  # all queued before any worker runs
    worker = Worker(env).start(db)
    try:
        jobs = [poll_job(client, job_id, finished) for job_id in ids]
    finally:
        worker.stop()
    assert [job["status"] for job in jobs] == ["succeeded"] * 4, [job["error"] for job in jobs]
    assert [job["result"]["batch"]["jobs"] for job in jobs] == [3, 3, 3, 1]
    assert jobs[0]["result"]["batch"]["rows"] == 2 * (1 + 4 + 1)  # guidance 1.5 doubles the rows
    assert all(job["deliveries"] == 1 for job in jobs) and all(job["progress"]["step"] == 10 for job in jobs[:3])

    digits = load_model("digits")
    plan = make_plan("fora", 10, digits.branch_layout, interval=2)
    for body, job in zip(compatible, jobs, strict=False):
        request = GenerationRequest(
            class_labels=body["class_labels"],
            num_images_per_prompt=body.get("num_images", 1),
            steps=10,
            seed=body["seed"],
        )
        alone = (generate(digits, request, plan).images * 255).round().numpy()
        for index, link in enumerate(job["links"]["images"]):
            served = np.asarray(Image.open(io.BytesIO(client.get(link).content)), dtype=np.float32)
            assert np.abs(served - alone[index, 0]).max() <= 1  # equal up to 8-bit rounding


def test_a_canceled_job_leaves_its_batch_and_the_others_finish(stack):
    client, env, db = stack
    body = {"class_labels": [3], "steps": 400, "acceleration": FORA}
    ids = submit_all(client, [body, body, body])
    worker = Worker(env).start(db)
    try:
        poll_job(client, ids[1], lambda job: job["progress"].get("step", 0) > 0)
        assert client.delete(f"/jobs/{ids[1]}").status_code == 202
        jobs = [poll_job(client, job_id, finished) for job_id in ids]
    finally:
        worker.stop()
    assert [job["status"] for job in jobs] == ["succeeded", "canceled", "succeeded"]
    assert jobs[0]["result"]["batch"]["jobs"] == jobs[2]["result"]["batch"]["jobs"] == 3
    assert jobs[1]["progress"]["step"] < 400 and jobs[1]["result"] is None


def test_a_pool_child_killed_during_a_batch_brings_every_job_of_it_to_one_end(stack):
    client, env, db = stack
    body = {"class_labels": [6], "steps": 300}
    ids = submit_all(client, [body, body, body])
    worker = Worker(env).start(db)
    try:
        for job_id in ids:
            poll_job(client, job_id, lambda job: job["progress"].get("step", 0) > 0)
        os.kill(worker.children()[0].pid, signal.SIGKILL)
        jobs = [poll_job(client, job_id, finished) for job_id in ids]
    finally:
        worker.stop()
    assert [job["status"] for job in jobs] == ["succeeded"] * 3, [job["error"] for job in jobs]
    assert all(job["deliveries"] >= 2 for job in jobs)  # each counted its second run
    assert all(len(job["links"]["images"]) == 1 for job in jobs)


def test_a_lone_job_starts_at_once_and_no_batch_waits_past_its_limit(stack):
    client, env, db = stack
    worker = Worker(dict(env, HARMONICA_BATCH_WAIT_MS="400")).start(db)
    try:
        (lone,) = submit_all(client, [{"class_labels": [2], "steps": 5}])
        job = poll_job(client, lone, finished)
        assert job["status"] == "succeeded" and job["result"]["batch"]["jobs"] == 1
        assert job["result"]["batch"]["wait_s"] < 0.4  # nothing compatible was queued: no wait for companions
        ids = submit_all(client, [{"class_labels": [2], "steps": 5}] * 4)
        jobs = [poll_job(client, job_id, finished) for job_id in ids]
    finally:
        worker.stop()
    assert all(job["status"] == "succeeded" for job in jobs)
    assert all(job["result"]["batch"]["wait_s"] <= 0.4 + 1 for job in jobs)  # the limit, plus one Redis call
