"""The job record's guards against real Redis: final states stick, limits hold, one lease at a time, key binding."""

from __future__ import annotations

import time

import pytest
import redis

from app.contract.jobs import Job, JobStore, new_job_id, now
from tests.servicekit import queued_job, redis_database


@pytest.fixture
def store(tmp_path):
    with redis_database(tmp_path) as url:
        yield JobStore(redis.Redis.from_url(url), "test:", ttl_seconds=60)


def test_a_final_state_is_never_overwritten(store):
    job = queued_job(store)
    assert store.transition(job.id, ("queued",), "running", started_at=now()) == "queued"
    assert store.transition(job.id, ("queued", "running"), "succeeded", result={"images": ["000.png"]}) == "running"
    assert store.transition(job.id, ("queued", "running"), "failed", error={"code": "x"}) == "succeeded"
    store.report_progress(job.id, {"step": 1})  # progress after the end: ignored
    record = store.get(job.id)
    assert record.status == "succeeded" and record.error is None and record.progress == {}
    assert record.result == {"images": ["000.png"]} and record.finished_at is not None
    assert 0 < store.redis.ttl(f"test:job:{job.id}") <= 60  # finished records expire
    assert store.transition("missing", ("queued",), "running") is None


def test_cancel_is_immediate_when_queued_and_a_flag_when_running(store):
    queued, running = queued_job(store), queued_job(store)
    store.transition(running.id, ("queued",), "running")
    assert store.request_cancel(queued.id) == "queued" and store.get(queued.id).status == "canceled"
    assert store.request_cancel(running.id) == "running"
    assert store.get(running.id).status == "running" and store.cancel_requested(running.id)


def test_one_lease_at_a_time_renewed_only_by_its_holder(store):
    job = queued_job(store)
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
    jobs = [queued_job(store) for _ in range(5)]
    first, cursor = store.list("alice", 3)
    rest, last = store.list("alice", 3, cursor)
    assert [j.id for j in first + rest] == [j.id for j in reversed(jobs)] and last is None


def test_admission_counts_active_and_queued_jobs_and_final_states_free_them(store):
    first, second = queued_job(store), queued_job(store)
    refused = Job(new_job_id(), "generate", "queued", "alice", "digits", {}, now())
    assert store.admit(refused, max_active=2, max_queued=100) == "key_busy"
    assert store.admit(refused, max_active=100, max_queued=2) == "queue_full"
    assert store.get(refused.id) is None  # a refusal writes nothing
    assert store.queued("generate") == 2 and store.active("alice") == 2 and set(store.live()) == {first.id, second.id}
    store.transition(first.id, ("queued",), "running")
    assert store.queued("generate") == 1 and store.active("alice") == 2  # running still counts for its key
    store.transition(first.id, ("running",), "succeeded")
    store.transition(second.id, ("queued",), "canceled")
    assert store.queued("generate") == 0 and store.active("alice") == 0 and store.live() == []


def test_a_lease_comes_back_to_its_holder_after_it_expired_but_never_from_another(store):
    job = queued_job(store)
    assert store.acquire_lease(job.id, "a", 0.05)
    time.sleep(0.1)  # expired, as during a Redis outage longer than the lease
    assert store.renew_lease(job.id, "a", 5) and store.leased(job.id)
    assert not store.renew_lease(job.id, "b", 5)


def test_worker_keys_expire_without_heartbeats(store):
    store.mark_loaded("w@x", {"digits": "f"}, 1)
    store.heartbeat("w@x", ["gen"], 1)
    assert set(store.workers()) == {"w@x"}
    time.sleep(1.5)
    assert store.workers() == {} and not store.redis.exists("test:loaded:w@x")


def test_a_batch_claims_the_oldest_compatible_queued_jobs_that_fit_its_rows(store):
    first, second, big = (queued_job(store, batch=("k", rows)) for rows in (2, 2, 4))
    canceled, other, plain = queued_job(store, batch=("k", 2)), queued_job(store, batch=("j", 2)), queued_job(store)
    store.request_cancel(canceled.id)
    assert store.claim_batch("k", rows=5, token="w1", seconds=30) == [first.id, second.id]  # big does not fit
    for job in (first, second):
        record = store.get(job.id)
        assert record.status == "running" and record.deliveries == 1 and record.started_at is not None
        assert store.redis.get(f"test:job:{job.id}:lease") == b"w1"
    assert store.queued("generate") == 3  # big, other and plain wait; the canceled job left the queue
    assert store.claim_batch("k", rows=8, token="w2", seconds=30) == [big.id]
    assert store.claim_batch("k", rows=8, token="w2", seconds=30) == []
    assert store.get(other.id).status == "queued" and store.get(plain.id).status == "queued"
    # the reconciler's requeue puts a lost batch job back where batches find it
    store.release_lease(first.id, "w1")
    assert store.transition(first.id, ("running",), "queued", unleased=True) == "running"
    assert store.claim_batch("k", rows=2, token="w3", seconds=30) == [first.id]
    assert store.get(first.id).deliveries == 2
