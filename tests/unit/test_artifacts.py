"""The artifact store's two backends against the same contract: a folder, and a real S3-compatible server (moto's
server mode on a loopback port); the router registry on both."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import pytest

from app.contract.artifacts import (
    ArtifactMissing,
    ArtifactStore,
    LocalStore,
    S3Store,
    StoreUnavailable,
    open_store,
)
from app.contract.registry import RouterRegistry
from app.contract.settings import Settings
from app.embedded_redis import free_port
from harmonica_core.catalog import builtin_routers
from tests.servicekit import s3_server

ROUTER = builtin_routers()["builtin-digits-iepo-ddim-t20"].read_bytes()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as settings:
        yield settings


def s3_store(s3: dict[str, str], cache: Path, **changes: str) -> S3Store:
    """A store in the server's bucket, under a prefix of its own so that tests never see each other's objects."""
    options = {
        "bucket": s3["HARMONICA_S3_BUCKET"],
        "prefix": f"test-{uuid.uuid4().hex[:8]}",
        "endpoint_url": s3["HARMONICA_S3_ENDPOINT_URL"],
        "access_key_id": s3["HARMONICA_S3_ACCESS_KEY_ID"],
        "secret_access_key": s3["HARMONICA_S3_SECRET_ACCESS_KEY"],
        "cache_dir": cache,
    }
    return S3Store(**(options | changes))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    return s3_store(request.getfixturevalue("s3"), tmp_path / "cache")


def test_objects_round_trip_list_and_delete(store):
    store.put_bytes("jobs/a/000.png", b"first")
    store.put_bytes("jobs/a/000.png", b"image 0")  # replaced whole
    store.put_bytes("jobs/a/grid.png", b"grid")
    store.put_bytes("jobs/b/000.png", b"other job")
    store.put_bytes("routers/alice/r-1.safetensors", b"router")
    assert store.get_bytes("jobs/a/000.png") == b"image 0"
    info, chunks = store.open("jobs/a/grid.png")
    assert (info.key, info.size, b"".join(chunks)) == ("jobs/a/grid.png", 4, b"grid")
    assert store.info("jobs/a/grid.png") == info and info.modified > 0 and info.etag
    assert store.info("jobs/a/missing.png") is None
    listed = store.list("jobs/")
    assert [item.key for item in listed] == ["jobs/a/000.png", "jobs/a/grid.png", "jobs/b/000.png"]
    assert [item.key for item in store.list("routers/alice/")] == ["routers/alice/r-1.safetensors"]
    assert store.list("routers/bob/") == []

    store.delete("jobs/b/000.png")
    store.delete("jobs/b/000.png")  # nothing there: no error
    store.delete_prefix("jobs/a/")
    assert store.list("jobs/") == []
    assert store.get_bytes("routers/alice/r-1.safetensors") == b"router"


def test_a_missing_object_is_artifact_missing(store):
    for read in (store.open, store.get_bytes, store.local_path):
        with pytest.raises(ArtifactMissing):
            read("jobs/nope/000.png")


@pytest.mark.parametrize("key", ["../x", "/abs", "jobs//a", "jobs/.hidden", "jobs/a/", ""])
def test_keys_are_plain_relative_paths(store, key):
    with pytest.raises(ValueError, match="not a relative path"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="not a folder"):
        store.delete_prefix(key.rstrip("/"))  # never the whole store, nor anything outside it


def test_publish_moves_a_scratch_file_in_and_local_path_follows_its_versions(store, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "router.safetensors").write_bytes(b"version 1")
    store.publish("routers/alice/r-1.safetensors", scratch / "router.safetensors")
    assert not (scratch / "router.safetensors").exists()
    first = store.local_path("routers/alice/r-1.safetensors")
    assert first.read_bytes() == b"version 1"
    assert store.local_path("routers/alice/r-1.safetensors") == first  # fetched once per version
    store.put_bytes("routers/alice/r-1.safetensors", b"version 2")
    assert store.local_path("routers/alice/r-1.safetensors").read_bytes() == b"version 2"


def test_only_the_object_store_has_urls(tmp_path, s3):
    assert LocalStore(tmp_path).url("jobs/a/000.png", 60) is None
    store = s3_store(s3, tmp_path)
    store.put_bytes("jobs/a/000.png", b"\x89PNG bytes")
    with urllib.request.urlopen(store.url("jobs/a/000.png", 60), timeout=10) as response:
        assert response.read() == b"\x89PNG bytes" and response.headers["Content-Type"] == "image/png"
    with urllib.request.urlopen(store.url("jobs/a/000.png", 60, filename="zero.png"), timeout=10) as response:
        assert response.headers["Content-Disposition"] == 'attachment; filename="zero.png"'
    # Signed for the host clients use, which may differ from the one the service reaches.
    public = s3["HARMONICA_S3_ENDPOINT_URL"].replace("127.0.0.1", "localhost")
    url = s3_store(s3, tmp_path, prefix=store.prefix, public_endpoint_url=public).url("jobs/a/000.png", 60)
    assert url.startswith(public + "/")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG bytes"


def test_an_unreachable_store_or_a_missing_bucket_is_store_unavailable(tmp_path, s3):
    closed = s3_store(s3, tmp_path, endpoint_url=f"http://127.0.0.1:{free_port()}")
    for read, argument in ((closed.info, "jobs/a/0.png"), (closed.open, "jobs/a/0.png"), (closed.list, "jobs/")):
        with pytest.raises(StoreUnavailable, match="HARMONICA_S3_ENDPOINT_URL"):
            read(argument)
    no_bucket = s3_store(s3, tmp_path, bucket="no-such-bucket")
    with pytest.raises(StoreUnavailable, match="create the bucket"):
        no_bucket.put_bytes("jobs/a/0.png", b"x")
    with pytest.raises(StoreUnavailable, match="create the bucket"):
        no_bucket.list("jobs/")


def test_settings_choose_the_store_and_one_s3_client_per_process(tmp_path, s3):
    local = open_store(Settings(_env_file=None, artifacts_dir=tmp_path))
    assert local == LocalStore(tmp_path)
    values = {name.removeprefix("HARMONICA_").lower(): value for name, value in s3.items()}
    remote = open_store(Settings(_env_file=None, artifacts_dir=tmp_path, s3_prefix="/deep/er/", **values))
    assert isinstance(remote, S3Store) and remote.prefix == "deep/er/" and remote.cache_dir == tmp_path / "cache"
    assert open_store(Settings(_env_file=None, artifacts_dir=tmp_path, s3_prefix="/deep/er/", **values)) is remote
    assert "test-secret" not in repr(Settings(_env_file=None, **values))


def test_the_registry_on_either_store(store, tmp_path):
    alice, bob = RouterRegistry(store, "alice"), RouterRegistry(store, "bob")
    builtin = {entry.id for entry in alice.all()}
    assert builtin and all(entry.builtin for entry in alice.all())

    accepted = []
    entry = alice.add(ROUTER, "Mine", accepted.append)
    assert accepted == [entry] and entry.id.startswith("mine-") and not entry.builtin
    assert alice.get(entry.id).metadata == entry.metadata and alice.get(entry.id).summary()["created_at"] > 0
    assert {e.id for e in alice.all()} == builtin | {entry.id}
    assert bob.get(entry.id) is None and entry.id not in {e.id for e in bob.all()}
    assert alice.get(entry.id).local_file(store).read_bytes() == ROUTER

    def refuse(_):
        raise ValueError("not for this service")

    with pytest.raises(ValueError, match="not for this service"):
        alice.add(ROUTER, "Refused", refuse)
    assert {e.id for e in alice.all()} == builtin | {entry.id}  # nothing stored
    with pytest.raises(ValueError, match="not a safetensors"):
        alice.add(b"\x04\x00\x00\x00\x00\x00\x00\x00junk", "Junk", accepted.append)

    (tmp_path / "trained.safetensors").write_bytes(ROUTER)
    alice.publish("trained-1", tmp_path / "trained.safetensors")
    store.put_bytes(alice.key_for("broken-1"), b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert {e.id for e in alice.all()} == builtin | {entry.id, "trained-1"}  # the damaged one skipped
    assert alice.get("broken-1") is None

    alice.remove(entry.id)
    assert alice.get(entry.id) is None
    with pytest.raises(KeyError):
        alice.remove(entry.id)
    with pytest.raises(PermissionError):
        alice.remove(next(iter(builtin)))
