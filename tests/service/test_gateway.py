"""The gateway alone (no worker): auth, validation, idempotency, limits, errors as problem JSON."""

from __future__ import annotations

import pytest

from app.api.keys import digest, load_keys
from app.api.keys import main as keys_cli
from app.contract.artifacts import LocalStore, open_store
from app.contract.jobs import new_job_id
from app.contract.registry import RouterRegistry, trained_router_id
from app.contract.settings import Settings, get_settings
from harmonica_core.catalog import builtin_routers, read_router_metadata
from tests.servicekit import running_gateway

KEY = "hk_test-key"
BOB = {"Authorization": "Bearer hk_bob"}
CAROL = {"Authorization": "Bearer hk_carol"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    settings = {"HARMONICA_API_KEYS": f"alice:{digest(KEY)},bob:{digest('hk_bob')},carol:{digest('hk_carol')}",
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
    assert_problem(gateway.get("/jobs/abc", headers={"Authorization": "Basic x"}), 401, "Bearer scheme")
    assert_problem(gateway.get("/jobs", headers={"Authorization": KEY}), 401, "Bearer scheme")
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
        ({"acceleration": {"method": "delta", "usage": 0.9}}, "at most 50% cache usage"),
    ]
    for body, words in cases:
        problem = assert_problem(gateway.post("/generate", json=body), 422, words)
        assert problem["errors"], body
    assert_problem(gateway.post("/train-router", json={"objective": "magic"}), 422, "objective")
    assert_problem(gateway.post("/train-router", json={"iterations": 10**9}), 422, "iterations")


def test_unreadable_bodies_say_what_to_send(gateway):
    broken = gateway.post("/generate", content=b'{"class_labels": [1],\n "steps": }', headers=JSON)
    problem = assert_problem(broken, 422, "not valid JSON", "line 2 column 11")
    assert [e["field"] for e in problem["errors"]] == ["body"]
    not_json = [
        (b"class_labels=1", "application/x-www-form-urlencoded"),
        (b'{"class_labels": [1]}', "text/plain"),
        (b'{"class_labels": [1]}', None),
    ]
    for content, content_type in not_json:
        headers = {"Content-Type": content_type} if content_type else {}
        problem = assert_problem(gateway.post("/generate", content=content, headers=headers), 422)
        assert "Content-Type: application/json" in problem["errors"][0]["message"], problem
    assert_problem(gateway.post("/generate", content=b"", headers=JSON), 422, "send a JSON object")
    assert_problem(gateway.post("/generate", content='{"model": "é"}'.encode("latin-1"), headers=JSON), 400, "UTF-8")
    responses = gateway.get("/openapi.json").json()["paths"]["/generate"]["post"]["responses"]
    assert responses["400"]["content"]["application/problem+json"]


def test_405_allows_every_method_of_the_path(gateway):
    for method in ("PUT", "PATCH", "OPTIONS"):
        response = gateway.request(method, f"/jobs/{new_job_id()}")
        assert_problem(response, 405, "allows DELETE, GET")
        assert response.headers["allow"] == "DELETE, GET"
    assert gateway.put("/generate").headers["allow"] == "POST"


def test_unknown_ids_are_404(gateway):
    assert_problem(gateway.get("/jobs/0123456789abcdef"), 404, "no job")
    assert_problem(gateway.get(f"/jobs/{new_job_id()}"), 404, "no job")
    assert_problem(gateway.delete("/jobs/0123456789abcdef"), 404)
    assert_problem(gateway.get("/jobs/0123456789abcdef/images/0"), 404)
    assert_problem(gateway.get("/routers/nope"), 404, "GET /routers")
    assert_problem(gateway.get("/no-such-endpoint"), 404)


def test_malformed_ids_and_cursors_are_4xx_not_503(gateway):
    job_id = gateway.post("/generate", json={"class_labels": [3]}, headers=CAROL).json()["id"]
    gateway.app.state.service.store.acquire_lease(job_id, "a-worker", 60)  # the key `<job key>:lease` exists
    for path in (f"/jobs/{job_id}:lease", f"/jobs/{job_id.upper()}", f"/jobs/{job_id}x"):
        assert_problem(gateway.get(path, headers=CAROL), 404, "no job")
        assert_problem(gateway.delete(path, headers=CAROL), 404, "no job")
    assert gateway.delete(f"/jobs/{job_id}", headers=CAROL).json()["status"] == "canceled"
    for cursor in ("nan", "NaN", "inf", "-inf", "1e999"):
        problem = assert_problem(gateway.get(f"/jobs?cursor={cursor}", headers=CAROL), 422, "cursor")
        assert problem["errors"][0]["field"] == "cursor"


def test_a_full_last_page_has_no_next_link(gateway):
    for labels in ([1], [2]):  # Carol's only jobs besides the other tests' ended ones; canceled at once
        job_id = gateway.post("/generate", json={"class_labels": labels}, headers=CAROL).json()["id"]
        gateway.delete(f"/jobs/{job_id}", headers=CAROL)
    total = len(gateway.get("/jobs?limit=100", headers=CAROL).json()["jobs"])
    whole = gateway.get(f"/jobs?limit={total}", headers=CAROL).json()
    assert len(whole["jobs"]) == total and whole["next"] is None
    first = gateway.get(f"/jobs?limit={total - 1}", headers=CAROL).json()
    last = gateway.get(first["next"], headers=CAROL).json()
    assert len(first["jobs"]) == total - 1 and len(last["jobs"]) == 1 and last["next"] is None


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
    # No worker runs here, so accepted jobs stay queued (per-key limit 2, queue depth 3).
    body = {"steps": 4, "iterations": 1}
    first, second = (gateway.post("/train-router", json=body).json()["id"] for _ in range(2))
    busy = gateway.post("/train-router", json=body, headers={"Idempotency-Key": "retry-me"})
    assert assert_problem(busy, 429, "2 jobs queued or running")["title"] == "Too many jobs"
    gateway.delete(f"/jobs/{first}")  # an ended job frees its key's slot and its place in the queue
    # The refused request did not keep its Idempotency-Key: the retry is accepted, not a 409.
    third = gateway.post("/train-router", json=body, headers={"Idempotency-Key": "retry-me"})
    assert third.status_code == 202, third.text
    fourth = gateway.post("/train-router", json=body, headers=BOB)
    assert fourth.status_code == 202, fourth.text
    full = gateway.post("/train-router", json=body, headers=BOB)
    assert_problem(full, 429, "train queue holds 3")
    assert full.headers["retry-after"]
    for job_id, headers in ((second, {}), (third.json()["id"], {}), (fourth.json()["id"], BOB)):
        assert gateway.delete(f"/jobs/{job_id}", headers=headers).json()["status"] == "canceled"
    huge = {"class_labels": [1], "padding": "x" * 70000}
    assert_problem(gateway.post("/generate", json=huge), 413, "65536")
    chunked = iter([b'{"class_labels": [1], "padding": "', b"x" * 40000, b"x" * 40000, b'"}'])  # no Content-Length
    assert_problem(gateway.post("/generate", content=chunked, headers=JSON), 413, "65536")


def test_models_routers_and_openapi(gateway):
    models = gateway.get("/models").json()
    assert models[0]["id"] == "digits" and models[0]["num_classes"] == 10
    assert models[0]["size"] == models[0]["max_size"] == 8  # a DiT model's one size is also its largest
    assert "builtin-digits-iepo-ddim-t20" in models[0]["routers"]
    router = gateway.get("/routers/builtin-digits-iepo-ddim-t20").json()
    assert router["steps"] == 20 and router["scheduler"] == "ddim" and router["quality"]["theoretical_speedup"] > 2
    schema = gateway.get("/openapi.json").json()
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert all(field.get("description") for name, field in fields.items()), "every request field is documented"


def test_a_damaged_router_file_is_skipped_not_a_server_error(gateway):
    registry = RouterRegistry(open_store(get_settings()), "alice")
    registry.store.put_bytes(registry.key_for("broken-1"), b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    listing = gateway.get("/routers")
    assert listing.status_code == 200 and "broken-1" not in {r["id"] for r in listing.json()}
    assert_problem(gateway.get("/routers/broken-1"), 404)


def test_trained_routers_belong_to_the_key_that_trained_them(gateway):
    job_id = new_job_id()
    router_id = trained_router_id("Mine T20", job_id)
    assert router_id == trained_router_id("Mine T20", job_id) != trained_router_id("Mine T20", new_job_id())
    assert router_id.startswith("mine-t20-") and job_id[:8] not in router_id  # the id does not reveal the job
    registry = RouterRegistry(open_store(get_settings()), "alice")
    builtin = builtin_routers()["builtin-digits-iepo-ddim-t20"]
    registry.store.put_bytes(registry.key_for(router_id), builtin.read_bytes())

    def router_ids(headers: dict[str, str]) -> tuple[set[str], set[str]]:
        listed = {r["id"] for r in gateway.get("/routers", headers=headers).json()}
        models = gateway.get("/models", headers=headers).json()
        return listed, set(next(m for m in models if m["id"] == "digits")["routers"])

    assert all(router_id in ids and "builtin-digits-iepo-ddim-t20" in ids for ids in router_ids({}))
    assert all(router_id not in ids and "builtin-digits-iepo-ddim-t20" in ids for ids in router_ids(BOB))
    assert gateway.get(f"/routers/{router_id}").json()["builtin"] is False
    assert_problem(gateway.get(f"/routers/{router_id}", headers=BOB), 404, "no router")
    generate = {"class_labels": [1], "acceleration": {"method": "harmonica", "router_id": router_id}}
    assert_problem(gateway.post("/generate", json=generate, headers=BOB), 422, "no router")
    accepted = gateway.post("/generate", json=generate)
    assert accepted.status_code == 202, accepted.text
    gateway.delete(f"/jobs/{accepted.json()['id']}")
    assert_problem(gateway.get("/routers", headers={"Authorization": ""}), 401)


def test_router_files_download_upload_and_delete_for_their_owner_only(gateway):
    builtin = builtin_routers()["builtin-digits-iepo-ddim-t20"]
    data = builtin.read_bytes()
    download = gateway.get("/routers/builtin-digits-iepo-ddim-t20/file")
    assert download.status_code == 200 and download.content == data
    assert download.headers["content-type"] == "application/octet-stream"
    assert "builtin-digits-iepo-ddim-t20.safetensors" in download.headers["content-disposition"]
    assert_problem(gateway.get("/routers/nope/file"), 404, "no router")

    store = gateway.app.state.service.store
    upload = {
        "url": "/routers?name=Shared T20",
        "content": data,
        "headers": {"Content-Type": "application/octet-stream"},
    }
    store.forget_worker("w2@test")
    assert_problem(gateway.post(**upload), 503, "no worker has loaded 'digits'")
    store.mark_loaded("w2@test", {"digits": "other weights"}, 10)
    store.heartbeat("w2@test", ["gen"], 10)
    assert_problem(gateway.post(**upload), 422, "other weights")
    store.mark_loaded("w2@test", {"digits": read_router_metadata(builtin)["target"]["model_fingerprint"]}, 10)
    store.heartbeat("w2@test", ["gen"], 10)
    try:
        junk = b"\x04\x00\x00\x00\x00\x00\x00\x00junk"
        for bad, words in [(junk, "not a safetensors"), (data[:-8], "bytes"), (data + b"\x00" * 4, "bytes")]:
            assert_problem(gateway.post(**(upload | {"content": bad})), 422, words)
        created = gateway.post(**upload)
        assert created.status_code == 201, created.text
        router_id = created.json()["id"]
        assert router_id.startswith("shared-t20-") and created.headers["location"] == f"/routers/{router_id}"
        assert created.json()["builtin"] is False and created.json()["steps"] == 20
        assert gateway.post(**upload).json()["id"] == router_id  # the same file again: the same router
        assert gateway.get(f"/routers/{router_id}/file").content == data
        assert_problem(gateway.get(f"/routers/{router_id}/file", headers=BOB), 404)
        assert_problem(gateway.delete(f"/routers/{router_id}", headers=BOB), 404, "you have no router")
        assert_problem(gateway.delete("/routers/builtin-digits-iepo-ddim-t20"), 409, "built in")
        assert gateway.delete(f"/routers/{router_id}").status_code == 204
        assert_problem(gateway.get(f"/routers/{router_id}"), 404)
        assert_problem(gateway.delete(f"/routers/{router_id}"), 404)
    finally:
        store.forget_worker("w2@test")


def test_webhooks_are_refused_while_the_service_has_no_webhook_secret(gateway):
    body = {"class_labels": [1], "webhook": "https://example.com/hook"}
    problem = assert_problem(gateway.post("/generate", json=body), 422, "HARMONICA_WEBHOOK_SECRET")
    assert problem["errors"][0]["field"] == "webhook"
    assert_problem(gateway.get("/webhooks/secret"), 404, "off")


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "", "x" * 65])
def test_key_names_cannot_leave_the_routers_folder(name, tmp_path):
    with pytest.raises(ValueError, match="not a valid API key name"):
        RouterRegistry(LocalStore(tmp_path), name)
    with pytest.raises(ValueError, match="name:<64 hex sha256>"):
        load_keys(Settings(api_keys=f"{name}:{digest('hk_x')}"))
    assert keys_cli([name]) == 2
    assert RouterRegistry(LocalStore(tmp_path), "alice.v2").key_for("r-1") == "routers/alice.v2/r-1.safetensors"


def test_ready_only_once_a_worker_has_its_model_loaded(gateway):
    store = gateway.app.state.service.store
    assert_problem(gateway.get("/readyz"), 503, "no worker is alive")
    store.heartbeat("w1@test", ["gen"], 10)
    assert_problem(gateway.get("/readyz"), 503, "still loading")
    store.mark_loaded("w1@test", {"digits": "f1"}, 10)
    store.heartbeat("w1@test", ["gen"], 10)
    ready = {"w1@test": {"queues": ["gen"], "models": ["digits"], "fingerprints": {"digits": "f1"}}}
    assert gateway.get("/readyz").json()["workers"] == ready
    store.forget_worker("w1@test")
