"""The service end to end: the gateway in-process, a real Celery worker process, real Redis."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.servicekit import Worker, finished, metric_value, poll_job, running_gateway

LONG = {"class_labels": list(range(10)), "num_images": 6, "steps": 900}  # several seconds on a CPU


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("service")) as (client, env, db):
        worker = Worker(env).start(db)
        try:
            yield client, worker
        finally:
            worker.stop()


def test_generate_end_to_end_with_images_summary_and_cache_metrics(service):
    client, worker = service
    before = worker.metrics()
    body = {"class_labels": [3, 7], "num_images": 2, "steps": 20,
            "acceleration": {"method": "harmonica", "router_id": "builtin-digits-iepo-ddim-t20"}}  # fmt: skip
    response = client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/jobs/{job_id}"
    job = poll_job(client, job_id, finished)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["captions"] == ["3", "3", "7", "7"] and len(job["links"]["images"]) == 4
    assert 0.5 < result["cache_usage_rate"] < 0.6 and result["theoretical_speedup"] > 2.0
    assert result["computed_branches"] > 0 and result["reused_branches"] > 0
    assert result["execution_mode"] == "precomputed"  # the default, auto, on a CPU worker
    assert job["progress"] == {"step": 20, "total": 20} and job["deliveries"] == 1
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
    for link in job["links"]["images"]:
        png = client.get(link)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (8, 8)
    sheet = client.get(job["links"]["grid"])
    assert sheet.status_code == 200 and Image.open(io.BytesIO(sheet.content)).width >= 2 * 64
    after = worker.metrics()
    for outcome, count in (("computed", result["computed_branches"]), ("reused", result["reused_branches"])):
        labels = {"model": "digits", "method": "harmonica", "outcome": outcome}
        moved = metric_value(after, "harmonica_branch_evaluations_total", **labels) - metric_value(
            before, "harmonica_branch_evaluations_total", **labels
        )
        assert moved == count
    assert metric_value(after, "harmonica_jobs_completed_total", kind="generate", status="succeeded") >= 1
    assert metric_value(after, "harmonica_denoise_step_seconds_count", method="harmonica") >= 20
    gateway = client.get("/metrics").text
    assert metric_value(gateway, "harmonica_jobs_submitted_total", kind="generate", model="digits") >= 1
    assert metric_value(gateway, "harmonica_workers", queue="gen") == 1


def test_train_a_router_through_the_api_then_generate_with_it(service):
    client, _ = service
    body = {"steps": 6, "iterations": 40, "batch_size": 2, "eval_samples": 8, "beta": 1e-5, "name": "Tiny test"}
    job_id = client.post("/train-router", json=body).json()["id"]
    seen = []
    job = poll_job(client, job_id, lambda j: seen.append(j["progress"]) or finished(j), timeout=300)
    assert job["status"] == "succeeded", job["error"]
    iterations = [p["iteration"] for p in seen if "iteration" in p]
    assert iterations and iterations[-1] == 40 and {"loss", "cache_usage_rate"} <= set(seen[-1])
    router_id = job["result"]["router_id"]
    assert router_id.startswith("tiny-test-") and job["links"]["router"] == f"/routers/{router_id}"
    router = client.get(f"/routers/{router_id}").json()
    assert router["model"] == "digits" and router["steps"] == 6 and router["builtin"] is False
    assert router["quality"]["cache_usage_rate"] == job["result"]["quality"]["cache_usage_rate"]
    assert router_id in {r["id"] for r in client.get("/routers").json()}
    assert router_id in next(m for m in client.get("/models").json() if m["id"] == "digits")["routers"]

    gen = {"class_labels": [1], "steps": 6, "acceleration": {"method": "harmonica", "router_id": router_id}}
    done = poll_job(client, client.post("/generate", json=gen).json()["id"], finished)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["cache_usage_rate"] == pytest.approx(router["quality"]["cache_usage_rate"])

    wrong_steps = client.post("/generate", json={**gen, "steps": 20})
    assert wrong_steps.status_code == 422 and "trained for steps 6" in wrong_steps.json()["detail"]


def test_cancel_a_queued_and_a_running_job(service):
    client, _ = service
    running = client.post("/generate", json=LONG).json()["id"]
    queued = client.post("/generate", json={"class_labels": [5]}).json()["id"]
    assert poll_job(client, running, lambda j: finished(j) or j["progress"].get("step", 0) > 0)["status"] == "running"
    canceled = client.delete(f"/jobs/{queued}")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    assert client.delete(f"/jobs/{running}").json()["cancel_requested"] is True
    stopped = poll_job(client, running, finished)
    assert stopped["status"] == "canceled"
    assert 0 < stopped["progress"]["step"] < stopped["progress"]["total"]  # stopped early
    # The queued job's message still reaches the worker, which must not run it.
    later = client.post("/generate", json={"class_labels": [2]}).json()["id"]
    assert poll_job(client, later, finished)["status"] == "succeeded"
    never = client.get(f"/jobs/{queued}").json()
    assert never["status"] == "canceled" and never["started_at"] is None and never["deliveries"] == 0
    assert client.delete(f"/jobs/{later}").status_code == 409  # already succeeded


def test_cancel_a_running_training_between_router_updates(service):
    client, _ = service
    body = {"steps": 6, "iterations": 5000, "batch_size": 2, "eval_samples": 4}
    job_id = client.post("/train-router", json=body).json()["id"]
    running = poll_job(client, job_id, lambda j: finished(j) or j["progress"].get("iteration", 0) > 0)
    assert running["status"] == "running"
    client.delete(f"/jobs/{job_id}")
    stopped = poll_job(client, job_id, finished)
    assert stopped["status"] == "canceled" and stopped["progress"]["iteration"] < 5000
    assert stopped["result"] is None


def test_readiness_health_and_listing(service):
    client, _ = service
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and any("gen" in w["queues"] for w in ready["workers"].values())
    assert all(w["models"] == ["digits"] for w in ready["workers"].values())  # resident, not just started
    page = client.get("/jobs", params={"limit": 1}).json()
    assert len(page["jobs"]) == 1 and page["next"].startswith("/jobs?limit=1&cursor=")
    second = client.get(page["next"]).json()
    assert second["jobs"][0]["created_at"] < page["jobs"][0]["created_at"]
