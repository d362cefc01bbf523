"""The job record's guards against real Redis: final states stick, one lease at a time, key binding."""

from __future__ import annotations

import pytest
import redis

from app.jobs import Job, JobStore, new_job_id, now
from tests.servicekit import redis_database


@pytest.fixture
def store(tmp_path):
    with redis_database(tmp_path) as url:
        yield JobStore(redis.Redis.from_url(url), "test:", ttl_seconds=60)


def make_job(store: JobStore) -> Job:
    job = Job(new_job_id(), "generate", "queued", "alice", "digits", {"steps": 2}, now())
    store.create(job)
    return job


def test_a_final_state_is_never_overwritten(store):
    job = make_job(store)
    assert store.transition(job.id, ("queued",), "running", started_at=now()) == "queued"
    assert store.transition(job.id, ("queued", "running"), "succeeded", result={"images": ["000.png"]}) == "running"
    assert store.transition(job.id, ("queued", "running"), "failed", error={"code": "x"}) == "succeeded"
    store.update(job.id, progress={"step": 1})  # progress after the end: ignored
    record = store.get(job.id)
    assert record.status == "succeeded" and record.error is None and record.progress == {}
    assert record.result == {"images": ["000.png"]} and record.finished_at is not None
    assert 0 < store.redis.ttl(f"test:job:{job.id}") <= 60  # finished records expire
    assert store.transition("missing", ("queued",), "running") is None


def test_cancel_is_immediate_when_queued_and_a_flag_when_running(store):
    queued, running = make_job(store), make_job(store)
    store.transition(running.id, ("queued",), "running")
    assert store.request_cancel(queued.id) == "queued" and store.get(queued.id).status == "canceled"
    assert store.request_cancel(running.id) == "running"
    assert store.get(running.id).status == "running" and store.cancel_requested(running.id)


def test_one_lease_at_a_time_renewed_only_by_its_holder(store):
    job = make_job(store)
    assert store.acquire_lease(job.id, "a", 5)
    assert not store.acquire_lease(job.id, "b", 5)
    assert store.renew_lease(job.id, "a", 5) and not store.renew_lease(job.id, "b", 5)
    store.release_lease(job.id, "b")  # not b's to release
    assert not store.acquire_lease(job.id, "b", 5)
    store.release_lease(job.id, "a")
    assert store.acquire_lease(job.id, "b", 5)


def test_idempotency_key_binds_once_and_pages_are_newest_first(store):
    assert store.claim_idempotency_key("alice", "k", "job1", "f1") is None
    assert store.claim_idempotency_key("alice", "k", "job2", "f2") == ("job1", "f1")
    assert store.claim_idempotency_key("bob", "k", "job3", "f1") is None  # keys are per owner
    jobs = [make_job(store) for _ in range(5)]
    first, cursor = store.list("alice", 3)
    rest, last = store.list("alice", 3, cursor)
    assert [j.id for j in first + rest] == [j.id for j in reversed(jobs)] and last is None
