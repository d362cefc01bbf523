"""The reconciler and the job store's indexes against a real redis-server: lost jobs come back, live ones stay."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis

from app.contract.artifacts import LocalStore, S3Store
from app.contract.jobs import JobStore, new_job_id
from app.contract.queue import enqueue, make_celery
from app.contract.reconcile import Reconciler, delete_expired_artifacts, message_job_ids
from app.contract.settings import Settings
from tests.servicekit import queued_job, redis_database, s3_server

LEASE = 5.0


@pytest.fixture
def url(tmp_path):
    with redis_database(tmp_path) as url:
        yield url


@pytest.fixture
def store(url) -> JobStore:
    return JobStore(redis.Redis.from_url(url), "test:", ttl_seconds=60)


@pytest.fixture
def settings(url) -> Settings:
    return Settings(redis_url=url, lease_seconds=LEASE, reconcile_interval=1)


class Sent(list):
    def __call__(self, kind: str, job_id: str) -> None:
        self.append((kind, job_id))


def test_a_running_job_whose_lease_expired_is_requeued_after_a_second_look(store, settings):
    job, held = queued_job(store), queued_job(store)
    for each in (job, held):
        store.transition(each.id, ("queued",), "running")
    assert store.acquire_lease(held.id, "live-worker", 60)
    sent = Sent()
    reconciler = Reconciler(store, settings, sent)
    start = time.time()
    assert reconciler.sweep(at=start).suspects == 1 and sent == []  # first sight: maybe Redis just came back
    assert reconciler.sweep(at=start + LEASE / 2).requeued == []  # not yet: a live worker may still re-take it
    report = reconciler.sweep(at=start + LEASE)
    assert report.requeued == [job.id] and sent == [("generate", job.id)]
    assert report.recovered == [(job.id, "generate", "worker_lost")]  # what the worker records as a metric
    assert store.get(job.id).status == "queued" and store.queued("generate") == 1
    assert store.get(held.id).status == "running"  # a held lease is never taken


def test_a_queued_job_without_a_message_is_sent_again_and_one_with_a_message_is_left(store, settings):
    celery = make_celery(settings)
    carried, lost = queued_job(store), queued_job(store, kind="train_router")
    enqueue(celery, carried.kind, carried.id)  # a real Celery message in the `gen` queue
    assert message_job_ids(store.redis) == {carried.id}
    sent = Sent()
    reconciler = Reconciler(store, settings, sent)
    reconciler.sweep(at=0)
    report = reconciler.sweep(at=LEASE)
    assert report.resent == [lost.id] and sent == [("train_router", lost.id)]
    assert report.recovered == [(lost.id, "train_router", "message_lost")]
    enqueue(celery, lost.kind, lost.id)
    assert reconciler.sweep(at=2 * LEASE).suspects == 0
    assert store.redis.hlen("test:orphans") == 0  # suspicion is dropped once a message carries the job


def test_a_message_delivered_but_not_acked_carries_its_job_until_it_is_stale(store):
    fresh, stale = queued_job(store), queued_job(store)
    for tag, job, delivered in (("tag-1", fresh, 1000.0), ("tag-2", stale, 900.0)):
        message = {"headers": {"id": job.id, "task": "harmonica.generate"}, "properties": {"correlation_id": job.id}}
        store.redis.hset("unacked", tag, json.dumps([message, "", "gen"]))
        store.redis.zadd("unacked_index", {tag: delivered})
    assert message_job_ids(store.redis) == {fresh.id, stale.id}
    # Delivered long ago and never started (its worker died while loading a model): no longer carried.
    assert message_job_ids(store.redis, unacked_since=950.0) == {fresh.id}


def test_only_one_process_sweeps_per_interval(store, settings):
    first, second = Reconciler(store, settings, Sent()), Reconciler(store, settings, Sent())
    assert first.sweep_if_due() is not None and second.sweep_if_due() is None


def test_files_of_expired_jobs_are_deleted_and_others_kept(store, tmp_path):
    """With the local store, a job's scratch folder and its artifacts are one folder."""
    jobs_dir = tmp_path / "artifacts" / "jobs"
    kept, expired, young = queued_job(store).id, new_job_id(), new_job_id()
    for name in (kept, expired, young):
        (jobs_dir / name).mkdir(parents=True)
        (jobs_dir / name / "checkpoint.pt").write_bytes(b"x")
    old = time.time() - 7200
    for name in (kept, expired):
        os.utime(jobs_dir / name / "checkpoint.pt", (old, old))
        os.utime(jobs_dir / name, (old, old))
    artifacts = LocalStore(tmp_path / "artifacts")
    assert delete_expired_artifacts(store, artifacts, jobs_dir, min_age=3600) == [expired]
    assert sorted(p.name for p in jobs_dir.iterdir()) == sorted([kept, young])


def test_objects_of_expired_jobs_are_deleted_from_the_object_store(store, tmp_path):
    """With an object store, a job's artifacts are objects and its scratch folder is this worker's."""
    with s3_server() as s3:
        artifacts = S3Store(
            s3["HARMONICA_S3_BUCKET"],
            "prod/",
            s3["HARMONICA_S3_ENDPOINT_URL"],
            access_key_id=s3["HARMONICA_S3_ACCESS_KEY_ID"],
            secret_access_key=s3["HARMONICA_S3_SECRET_ACCESS_KEY"],
        )
        scratch = tmp_path / "artifacts" / "jobs"
        kept, expired, failed = queued_job(store).id, new_job_id(), new_job_id()
        for job_id in (kept, expired):
            artifacts.put_bytes(f"jobs/{job_id}/000.png", b"png")
            artifacts.put_bytes(f"jobs/{job_id}/grid.png", b"png")
        (scratch / failed).mkdir(parents=True)  # a training that failed left its checkpoint on this worker
        (scratch / failed / "checkpoint.pt").write_bytes(b"x")
        assert delete_expired_artifacts(store, artifacts, scratch, min_age=3600) == []  # all young
        later = time.time() + 7200
        assert delete_expired_artifacts(store, artifacts, scratch, 3600, at=later) == sorted([expired, failed])
        assert {item.key for item in artifacts.list("jobs/")} == {f"jobs/{kept}/000.png", f"jobs/{kept}/grid.png"}
        assert not (scratch / failed).exists()


def test_progress_never_goes_backwards_on_a_redelivered_job(store):
    from worker.tasks import Lease, reporter

    job = queued_job(store, kind="train_router")
    store.transition(job.id, ("queued",), "running")
    store.report_progress(job.id, {"iteration": 12, "total": 40})
    job = store.get(job.id)  # as a redelivery reads it
    report = reporter(store, job, Lease(store, job.id, LEASE), RuntimeError)
    for iteration in (10, 11, 12):  # replayed from the checkpoint: the record holds at 12
        report({"iteration": iteration, "total": 40})
        assert store.get(job.id).progress["iteration"] == 12
    report({"iteration": 13, "total": 40})
    assert store.get(job.id).progress["iteration"] == 13
