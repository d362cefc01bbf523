"""The gateway alone (no worker): auth, validation, idempotency, limits, errors as problem JSON."""

from __future__ import annotations

import pytest

from app.keys import digest
from tests.servicekit import running_gateway

KEY = "hk_test-key"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    settings = {"HARMONICA_API_KEYS": f"alice:{digest(KEY)},bob:{digest('hk_bob')}",
                "HARMONICA_MAX_QUEUE_DEPTH": "3", "HARMONICA_MAX_ACTIVE_JOBS_PER_KEY": "2",
                "HARMONICA_MAX_IMAGES_PER_JOB": "12"}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with running_gateway(tmp_path_factory.mktemp("gateway"), headers, **settings) as (client, _, _):
        yield client


def assert_problem(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def test_missing_or_wrong_api_key_is_401(gateway):
    body = {"class_labels": [1]}
    missing = gateway.post("/generate", json=body, headers={"Authorization": ""})
    assert_problem(missing, 401, "Authorization: Bearer")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_problem(gateway.post("/generate", json=body, headers={"Authorization": "Bearer nope"}), 401, "unknown")
    assert_problem(gateway.get("/jobs/abc", headers={"Authorization": "Basic x"}), 401)
    assert gateway.get("/healthz", headers={"Authorization": ""}).status_code == 200  # operations stay open


def test_invalid_bodies_are_422_problems_that_name_the_field(gateway):
    cases = [
        ({"class_labels": [1], "steps": 0}, "steps"),
        ({"class_labels": [1], "unknown": 1}, "unknown"),
        ({"class_labels": [12]}, "class labels must be in [0, 9]"),
        ({"prompts": ["a cat"]}, "class-conditional"),
        ({"class_labels": [1], "height": 64}, "8x8"),
        ({"class_labels": [1], "steps": 5000}, "at most 1000"),
        ({"class_labels": [1, 2, 3], "num_images": 5}, "at most 12"),
        ({"model": "nope"}, "not served"),
        ({"acceleration": {"method": "harmonica"}}, "needs a router_id"),
        ({"acceleration": {"method": "harmonica", "router_id": "missing"}}, "no router"),
        ({"acceleration": {"method": "fora", "router_id": "builtin-digits-iepo-ddim-t20"}}, "uses no router"),
        ({"steps": 10, "acceleration": {"method": "harmonica", "router_id": "builtin-digits-iepo-ddim-t20"}}, "steps"),
        ({"acceleration": {"method": "l2c", "router_id": "builtin-digits-iepo-ddim-t20"}}, "runs under method"),
    ]
    for body, words in cases:
        problem = assert_problem(gateway.post("/generate", json=body), 422, words)
        assert problem["errors"], body
    assert_problem(gateway.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"}), 422)
    assert_problem(gateway.post("/train-router", json={"objective": "magic"}), 422, "objective")
    assert_problem(gateway.post("/train-router", json={"iterations": 10**9}), 422, "iterations")


def test_unknown_ids_are_404(gateway):
    assert_problem(gateway.get("/jobs/0123456789abcdef"), 404, "no job")
    assert_problem(gateway.delete("/jobs/0123456789abcdef"), 404)
    assert_problem(gateway.get("/jobs/0123456789abcdef/images/0"), 404)
    assert_problem(gateway.get("/routers/nope"), 404, "GET /routers")
    assert_problem(gateway.get("/no-such-endpoint"), 404)


def test_jobs_belong_to_their_key(gateway):
    job = gateway.post("/generate", json={"class_labels": [1]}).json()
    assert gateway.get(f"/jobs/{job['id']}").status_code == 200
    other = {"Authorization": "Bearer hk_bob"}
    assert_problem(gateway.get(f"/jobs/{job['id']}", headers=other), 404)
    assert job["id"] not in {j["id"] for j in gateway.get("/jobs", headers=other).json()["jobs"]}
    gateway.delete(f"/jobs/{job['id']}")


def test_idempotency_key_replays_the_job_and_refuses_another_body(gateway):
    headers = {"Idempotency-Key": "order-42"}
    first = gateway.post("/generate", json={"class_labels": [4]}, headers=headers)
    again = gateway.post("/generate", json={"class_labels": [4]}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["location"] == first.headers["location"]
    assert_problem(gateway.post("/generate", json={"class_labels": [5]}, headers=headers), 422, "different body")
    other_key = gateway.post("/generate", json={"class_labels": [4]}, headers={"Idempotency-Key": "order-43"})
    assert other_key.json()["id"] != first.json()["id"]
    for job in (first.json(), other_key.json()):
        assert gateway.delete(f"/jobs/{job['id']}").json()["status"] == "canceled"


def test_busy_key_and_full_queue_are_429_and_large_bodies_413(gateway):
    # No worker consumes here, so queued messages stay in the train queue (depth limit 3).
    bob = {"Authorization": "Bearer hk_bob"}
    body = {"steps": 4, "iterations": 1}
    first, _ = (gateway.post("/train-router", json=body).json()["id"] for _ in range(2))
    busy = assert_problem(gateway.post("/train-router", json=body), 429, "2 jobs queued or running")
    assert busy["title"] == "Too many jobs"
    gateway.delete(f"/jobs/{first}")  # an ended job frees its key's slot (its message stays queued)
    assert gateway.post("/train-router", json=body).status_code == 202
    full = gateway.post("/train-router", json=body, headers=bob)
    assert_problem(full, 429, "train queue holds 3")
    assert full.headers["retry-after"]
    huge = {"class_labels": [1], "padding": "x" * 70000}
    assert_problem(gateway.post("/generate", json=huge), 413, "65536")


def test_models_routers_and_openapi(gateway):
    models = gateway.get("/models").json()
    assert models[0]["id"] == "digits" and models[0]["num_classes"] == 10
    assert "builtin-digits-iepo-ddim-t20" in models[0]["routers"]
    router = gateway.get("/routers/builtin-digits-iepo-ddim-t20").json()
    assert router["steps"] == 20 and router["scheduler"] == "ddim" and router["quality"]["theoretical_speedup"] > 2
    schema = gateway.get("/openapi.json").json()
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert all(field.get("description") for name, field in fields.items()), "every request field is documented"


def test_a_damaged_router_file_is_skipped_not_a_server_error(gateway):
    from app.settings import get_settings

    routers = get_settings().routers_dir
    routers.mkdir(parents=True, exist_ok=True)
    (routers / "broken-1.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    listing = gateway.get("/routers")
    assert listing.status_code == 200 and "broken-1" not in {r["id"] for r in listing.json()}
    assert_problem(gateway.get("/routers/broken-1"), 404)


def test_ready_only_once_a_worker_has_its_model_loaded(gateway):
    store = gateway.app.state.service.store
    assert_problem(gateway.get("/readyz"), 503, "no worker is alive")
    store.heartbeat("w1@test", ["gen"], 10)
    assert_problem(gateway.get("/readyz"), 503, "still loading")
    store.mark_loaded("w1@test", ["digits"])
    store.heartbeat("w1@test", ["gen"], 10)
    assert gateway.get("/readyz").json()["workers"] == {"w1@test": {"queues": ["gen"], "models": ["digits"]}}
    store.forget_worker("w1@test")
