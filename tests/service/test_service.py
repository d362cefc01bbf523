"""The service end to end: the gateway in-process, a real Celery worker process, real Redis."""

from __future__ import annotations

import base64
import hmac
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from tests.servicekit import WAIT, Worker, finished, metric_value, poll_job, running_gateway, wait_until

LONG = {"class_labels": list(range(10)), "num_images": 6, "steps": 900}  # several seconds on a CPU


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    hooks = {"HARMONICA_WEBHOOK_SECRET": "test-secret", "HARMONICA_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"}
    with running_gateway(tmp_path_factory.mktemp("service"), **hooks) as (client, env, db):
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
    assert (job["progress"]["step"], job["progress"]["total"]) == (20, 20) and job["deliveries"] == 1
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


def read_events(client, job_id: str, last_event_id: str | None = None) -> list[dict]:
    """The job's Server-Sent Events until the stream ends, as {id, event, data} with the data decoded."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    events, event = [], {}
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in event:
                    events.append(event | {"data": json.loads(event["data"])})
                event = {}
            elif not line.startswith(":"):  # not a ping
                name, _, value = line.partition(": ")
                event[name] = value
    return events


def test_events_follow_a_real_job_to_its_end_and_resume_after_any_event(service):
    client, _ = service
    fora = {"method": "fora", "interval": 2}
    job_id = client.post("/generate", json={"class_labels": [4], "steps": 12, "acceleration": fora}).json()["id"]
    events = read_events(client, job_id)
    states = [e["data"]["status"] for e in events if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    steps = [e["data"] for e in events if e["event"] == "progress"]
    assert [s["step"] for s in steps] == list(range(1, 13)) and all(s["total"] == 12 for s in steps)
    branches = steps[0]["computed_branches"]
    assert branches > 0 and steps[0]["reused_branches"] == 0  # FORA: every branch computes at the first step
    assert [s["computed_branches"] + s["reused_branches"] for s in steps] == [branches] * 12
    assert [s["reused_branches"] for s in steps] == [0, branches] * 6  # and is reused at every other step
    assert all(s["step_seconds"] > 0 for s in steps)
    final = events[-1]["data"]
    assert (
        final["id"] == job_id and final["status"] == "succeeded" and final["result"]["reused_branches"] == 6 * branches
    )
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    for k in (0, 5, len(events) - 2):  # a reconnect after any event gets exactly the rest
        assert read_events(client, job_id, ids[k]) == events[k + 1 :]
    bad = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and "event id" in bad.json()["detail"]
    assert client.get(f"/jobs/{'0' * 32}/events").status_code == 404


def test_prefer_wait_answers_with_the_finished_job_or_as_usual(service):
    client, _ = service
    short = client.post("/generate", json={"class_labels": [1], "steps": 4}, headers={"Prefer": "wait=120"})
    assert short.status_code == 200 and short.headers["preference-applied"] == "wait=60"  # the setting's bound
    assert short.json()["status"] == "succeeded" and short.json()["result"]["images"]
    long = client.post("/generate", json=LONG, headers={"Prefer": "respond-async, wait=1"})
    assert long.status_code == 202 and long.json()["status"] in ("queued", "running")
    assert long.headers["preference-applied"] == "wait=1" and long.headers["location"] == f"/jobs/{long.json()['id']}"
    client.delete(f"/jobs/{long.json()['id']}")
    ended = client.get(f"/jobs/{long.json()['id']}", headers={"Prefer": "wait=60"})
    assert ended.status_code == 200 and ended.json()["status"] == "canceled"
    plain = client.post("/generate", json={"class_labels": [1], "steps": 4})
    assert plain.status_code == 202 and "preference-applied" not in plain.headers
    assert poll_job(client, plain.json()["id"], finished)["status"] == "succeeded"


def test_a_downloaded_router_uploaded_again_generates_like_the_original(service):
    client, _ = service
    data = client.get("/routers/builtin-digits-iepo-ddim-t20/file").content
    headers = {"Content-Type": "application/octet-stream"}
    wait_until(lambda: client.get("/readyz").status_code == 200, WAIT, "the worker's model and its fingerprint")
    created = client.post("/routers?name=copy", content=data, headers=headers)
    assert created.status_code == 201, created.text
    jobs = {}
    for router_id in ("builtin-digits-iepo-ddim-t20", created.json()["id"]):
        body = {"class_labels": [6], "seed": 3, "acceleration": {"method": "harmonica", "router_id": router_id}}
        jobs[router_id] = poll_job(client, client.post("/generate", json=body).json()["id"], finished)
    original, copy = jobs.values()
    assert original["status"] == copy["status"] == "succeeded"
    assert original["result"]["reused_branches"] == copy["result"]["reused_branches"] > 0
    first, second = (client.get(f"/jobs/{job['id']}/images/0").content for job in (original, copy))
    assert first == second


def test_webhooks_are_signed_retried_and_refused_for_private_hosts(service):
    client, _ = service
    received: list[tuple[dict, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            first_final = b"job.succeeded" in body and not any(b"job.succeeded" in b for _, b in received)
            received.append(({name.lower(): value for name, value in self.headers.items()}, body))
            self.send_response(500 if first_final else 204)  # the first final delivery fails: a retry must come
            self.end_headers()

        def log_message(self, *_) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"  # allowed by the fixture's settings
        body = {"class_labels": [2], "steps": 20, "webhook": url, "webhook_progress": True}
        job = client.post("/generate", json=body).json()
        assert poll_job(client, job["id"], finished)["status"] == "succeeded"
        wait_until(lambda: sum(b"job.succeeded" in body for _, body in received) == 2, WAIT, "webhook and retry")
    finally:
        server.shutdown()
    key = base64.b64decode(client.get("/webhooks/secret").json()["secret"].removeprefix("whsec_"))
    events = []
    for headers, raw in received:
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw
        assert headers["webhook-signature"] == "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode()
        events.append((headers["webhook-id"], json.loads(raw)))
    finals = [(message_id, event) for message_id, event in events if event["type"] == "job.succeeded"]
    assert finals[0][0] == finals[1][0]  # the retry is the same message (same webhook-id)
    assert finals[-1][1]["data"]["id"] == job["id"] and finals[-1][1]["data"]["result"]["images"]
    progress = [event["data"]["progress"]["step"] for _, event in events if event["type"] == "job.progress"]
    assert progress and all(0 < step <= 20 for step in progress)
    for refused, words in [
        ("http://10.1.2.3/x", "private"),
        ("http://localhost:9/x", "loopback"),
        ("ftp://a/b", "http"),
    ]:
        answer = client.post("/generate", json={"class_labels": [2], "webhook": refused})
        assert answer.status_code == 422 and words in answer.json()["detail"], answer.text


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
