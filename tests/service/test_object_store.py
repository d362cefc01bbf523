"""The service with its artifacts in an S3-compatible object store: the gateway in-process, a real Celery worker
process, real Redis, and moto's S3 server on a loopback port. Nothing lands in the local folder but scratch."""

from __future__ import annotations

import io
import urllib.request

import pytest
from PIL import Image

from app.contract.artifacts import S3Store
from app.embedded_redis import free_port
from tests.servicekit import Worker, finished, poll_job, running_gateway, s3_client, s3_server

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("object-store")
    with s3_server() as s3, running_gateway(tmp, **s3) as (client, env, db):
        worker = Worker(env).start(db)
        try:
            yield client, s3, tmp / "artifacts"
        finally:
            worker.stop()


def keys(s3: dict[str, str], prefix: str) -> set[str]:
    listed = s3_client(s3).list_objects_v2(Bucket=s3["HARMONICA_S3_BUCKET"], Prefix=prefix)
    return {item["Key"] for item in listed.get("Contents", [])}


def fetch(url: str) -> tuple[str, bytes]:
    """A GET from outside the gateway, as a client following a redirect does: (content type, body)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read()


def test_generated_images_are_served_from_the_object_store_as_bytes_or_presigned_urls(service, monkeypatch):
    client, s3, local = service
    response = client.post("/generate", json={"class_labels": [3, 7], "num_images": 1, "steps": 4})
    assert response.status_code == 202, response.text
    job = poll_job(client, response.json()["id"], finished)
    assert job["status"] == "succeeded", job["error"]
    assert keys(s3, f"jobs/{job['id']}/") == {f"jobs/{job['id']}/{name}" for name in ("000.png", "001.png", "grid.png")}
    assert not (local / "jobs" / job["id"]).exists()  # the scratch folder went with the upload

    image = client.get(job["links"]["images"][0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(PNG) and Image.open(io.BytesIO(image.content)).size == (8, 8)

    monkeypatch.setattr(client.app.state.service.settings, "artifact_redirect", True)
    for link, expected in ((job["links"]["images"][0], image.content), (job["links"]["grid"], None)):
        redirect = client.get(link, follow_redirects=False)
        assert redirect.status_code == 307, redirect.text
        location = redirect.headers["location"]
        assert location.startswith(s3["HARMONICA_S3_ENDPOINT_URL"] + "/") and "Signature=" in location
        kind, body = fetch(location)
        assert kind == "image/png" and body.startswith(PNG) and (expected is None or body == expected)

    s3_client(s3).delete_object(Bucket=s3["HARMONICA_S3_BUCKET"], Key=f"jobs/{job['id']}/001.png")
    for redirect in (True, False):  # a missing object is a 404 either way, never a 500 nor a dead link
        monkeypatch.setattr(client.app.state.service.settings, "artifact_redirect", redirect)
        missing = client.get(job["links"]["images"][1], follow_redirects=False)
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        assert "missing from the artifact store" in missing.json()["detail"]
    assert client.get(f"/jobs/{job['id']}/images/5").status_code == 404


def test_a_router_trained_into_the_object_store_is_listed_downloaded_and_used(service, monkeypatch):
    client, s3, local = service
    body = {"steps": 4, "iterations": 10, "batch_size": 2, "eval_samples": 4, "name": "Stored"}
    job = poll_job(client, client.post("/train-router", json=body).json()["id"], finished)
    assert job["status"] == "succeeded", job["error"]
    router_id = job["result"]["router_id"]
    key = f"routers/anonymous/{router_id}.safetensors"
    assert keys(s3, "routers/") == {key} and not (local / "routers").exists()
    assert router_id in {router["id"] for router in client.get("/routers").json()}
    assert client.get(f"/routers/{router_id}").json()["steps"] == 4

    stored = s3_client(s3).get_object(Bucket=s3["HARMONICA_S3_BUCKET"], Key=key)["Body"].read()
    download = client.get(f"/routers/{router_id}/file")
    assert download.status_code == 200 and download.content == stored
    assert f"{router_id}.safetensors" in download.headers["content-disposition"]
    monkeypatch.setattr(client.app.state.service.settings, "artifact_redirect", True)
    redirect = client.get(f"/routers/{router_id}/file", follow_redirects=False)
    assert redirect.status_code == 307 and fetch(redirect.headers["location"])[1] == stored

    # The worker fetches the router into its local cache to load it.
    generate = {"class_labels": [1], "steps": 4, "acceleration": {"method": "harmonica", "router_id": router_id}}
    done = poll_job(client, client.post("/generate", json=generate).json()["id"], finished)
    assert done["status"] == "succeeded", done["error"]
    assert list((local / "cache").glob("*.safetensors"))

    assert client.delete(f"/routers/{router_id}").status_code == 204
    assert keys(s3, "routers/") == set() and client.get(f"/routers/{router_id}/file").status_code == 404


def test_an_unreachable_object_store_is_a_503_that_says_to_retry(service, monkeypatch):
    client, s3, _ = service
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    away = S3Store(s3["HARMONICA_S3_BUCKET"], endpoint_url=closed, access_key_id="key", secret_access_key="secret")
    monkeypatch.setattr(client.app.state.service, "artifacts", away)
    response = client.get("/routers")
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Artifact store unavailable" and "retry" in response.json()["detail"]
    assert response.headers["retry-after"] == "10"
