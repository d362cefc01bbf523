"""Router training on two gloo processes through the real worker: the same router as one process, a killed rank
redelivers the job, which resumes from its checkpoint, and a cancel stops every rank."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import torch
from safetensors.torch import load

from harmonica_core.models import load_model
from harmonica_core.train_config import TrainConfig
from harmonica_core.training import train_router
from tests.servicekit import WAIT, Worker, finished, poll_job, running_gateway, wait_until

CONFIG = {"steps": 6, "batch_size": 2, "beta": 1e-5, "lambda_every": 10, "seed": 3}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("distributed"), HARMONICA_MAX_TRAIN_GPUS="2") as (client, env, db):
        worker = Worker(env, queues="train").start(db)
        try:
            yield client, worker
        finally:
            worker.stop()


def one_process_logits(iterations: int) -> torch.Tensor:
    """The router the same config trains in this one process."""
    config = TrainConfig(**CONFIG, iterations=iterations)
    return train_router(load_model("digits"), config).logits.detach()


def router_logits(client, job: dict) -> torch.Tensor:
    response = client.get(f"/routers/{job['result']['router_id']}/file")
    assert response.status_code == 200
    return load(response.content)["logits"]


def ranks(job_id: str) -> list[psutil.Process]:
    """The job's training processes (torchrun's children run `harmonica_core.cli` on the job's folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "harmonica_core.cli" in cmdline and job_id in cmdline and "torch.distributed.run" not in cmdline:
            found.append(process)
    return found


def test_a_two_process_job_trains_the_router_one_process_trains(service):
    client, _ = service
    job_id = client.post("/train-router", json={**CONFIG, "iterations": 20, "eval_samples": 4, "gpus": 2}).json()["id"]
    seen: list[dict] = []
    job = poll_job(client, job_id, lambda j: seen.append(j["progress"]) or finished(j))
    assert job["status"] == "succeeded", job["error"]
    assert [p["iteration"] for p in seen if "iteration" in p][-1] == 20  # rank 0's reports reached the job
    torch.testing.assert_close(router_logits(client, job), one_process_logits(20), atol=1e-4, rtol=0)
    assert ranks(job_id) == []


def test_a_killed_rank_sends_the_job_again_and_it_resumes_from_its_checkpoint(service):
    client, _ = service
    job_id = client.post("/train-router", json={**CONFIG, "iterations": 60, "eval_samples": 4, "gpus": 2}).json()["id"]
    job = poll_job(client, job_id, lambda j: finished(j) or j["progress"].get("iteration", 0) >= 12)
    assert job["status"] == "running", "the training ended before a rank could be killed"
    second = [p for p in ranks(job_id) if "RANK=1" in "\0".join(f"{k}={v}" for k, v in p.environ().items())]
    assert len(second) == 1
    os.kill(second[0].pid, signal.SIGKILL)
    job = poll_job(client, job_id, finished)
    assert job["status"] == "succeeded", job["error"]
    assert job["deliveries"] == 2
    # Resumed from the checkpoint written at a trajectory boundary: the same router as an uninterrupted run.
    torch.testing.assert_close(router_logits(client, job), one_process_logits(60), atol=1e-4, rtol=0)
    wait_until(lambda: ranks(job_id) == [], WAIT, "every rank gone")


def test_cancel_stops_every_rank(service):
    client, _ = service
    body = {**CONFIG, "iterations": 5000, "eval_samples": 4, "gpus": 2}
    job_id = client.post("/train-router", json=body).json()["id"]
    running = poll_job(client, job_id, lambda j: finished(j) or j["progress"].get("iteration", 0) > 0)
    assert running["status"] == "running" and len(ranks(job_id)) == 2
    client.delete(f"/jobs/{job_id}")
    stopped = poll_job(client, job_id, finished)
    assert stopped["status"] == "canceled" and stopped["progress"]["iteration"] < 5000
    wait_until(lambda: ranks(job_id) == [], WAIT, "every rank gone")


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"gpus": 3}, "gpus", "at most 2"),
        ({"gpus": 2, "batch_size": 3}, "batch_size", "multiple of gpus"),
        ({"gpus": 0}, "gpus", "greater than or equal to 1"),
    ],
)
def test_gpus_beyond_the_limit_or_not_dividing_the_batch_are_refused(service, body, field, says):
    client, _ = service
    response = client.post("/train-router", json={**CONFIG, **body})
    assert response.status_code == 422, response.text
    assert says in response.text and field in response.text
