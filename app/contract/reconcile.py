"""The reconciler: every accepted job ends in a final state, whatever died on the way.

The broker alone cannot promise that. Kombu returns a dead worker's unacked message only after the
visibility timeout, which must exceed the longest hard time limit (hours, for training), and a
Redis restart can lose a message that its job record outlived (or the reverse). So a sweep looks
at the job records themselves, the truth of the service, and finds two kinds of orphan:

- a `running` job whose lease has expired: its worker died (the lease is renewed every third of
  `lease_seconds` by a live holder, and re-taken by it after a Redis outage);
- a `queued` job without a lease that no message carries: none waits in a queue, and none was delivered
  to a worker within the last `UNACKED_LEASES` leases. A delivered message can strand its job without being
  acked: a worker killed while its pool child was still loading a model, or a pool child killed before it
  started the task, or a worker that lost Redis while it held the message; kombu hands it back only
  after the visibility timeout.

A job seen orphaned twice, `lease_seconds` apart (time for a live worker to re-take its lease after
Redis returns, and past the moment between a message's pop and its unacked entry), is put back:
a running one moves to `queued` in a script that checks its lease is still free, then its message is
sent again. The worker's delivery counter bounds the retries; its lease keeps a late copy of the old
message from running beside the new one. Workers run the sweep, one at a time under a Redis lock: it
needs no process of its own, and it runs wherever there is someone to run the jobs it re-enqueues.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from .artifacts import ArtifactStore
from .jobs import JobStore
from .kinds import QUEUES
from .settings import Settings

log = logging.getLogger("harmonica.reconciler")
UNACKED_LEASES = 3  # a message delivered this many leases ago whose job has not started no longer carries it


@dataclass
class Sweep:
    """What one sweep saw and did (the worker records `recovered` as metrics)."""

    live: int = 0
    suspects: int = 0
    recovered: list[tuple[str, str, str]] = field(default_factory=list)  # (job id, kind, reason) re-enqueued

    @property
    def requeued(self) -> list[str]:
        """Running jobs whose worker was lost, put back in the queue."""
        return [job_id for job_id, _, reason in self.recovered if reason == "worker_lost"]

    @property
    def resent(self) -> list[str]:
        """Queued jobs whose message was lost, sent again."""
        return [job_id for job_id, _, reason in self.recovered if reason == "message_lost"]


def message_job_ids(client: redis.Redis, unacked_since: float = 0.0) -> set[str]:
    """Job ids carried by a message waiting in a queue, or delivered to a worker at or after `unacked_since`
    and not yet acked (kombu's Redis layout: queue lists, and the `unacked` hash indexed by delivery time)."""
    queues = [
        name if priority == 0 else f"{name}{Channel.sep}{priority}" for name in QUEUES for priority in PRIORITY_STEPS
    ]
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.lrange(queue, 0, -1)
    pipe.zrangebyscore(Channel.unacked_index_key, unacked_since, "+inf")
    *waiting, tags = pipe.execute()
    messages = [json.loads(raw) for entries in waiting for raw in entries]
    if tags:
        messages += [json.loads(raw)[0] for raw in client.hmget(Channel.unacked_key, tags) if raw is not None]
    return {
        message.get("headers", {}).get("id") or message.get("properties", {}).get("correlation_id")
        for message in messages
    }


class Reconciler:
    def __init__(self, store: JobStore, settings: Settings, send: Callable[[str, str], None]) -> None:
        """`send(kind, job_id)` enqueues a job's message (`app.contract.queue.enqueue` on a Celery app)."""
        self.store, self.settings, self.send = store, settings, send
        self.redis = store.redis
        self.suspects_key = f"{store.prefix}orphans"  # job id -> when it was first seen orphaned
        self.lock_key = f"{store.prefix}reconciler"
        self.token = uuid.uuid4().hex

    def sweep_if_due(self) -> Sweep | None:
        """Sweep unless another process swept within the last interval (a lock that expires by itself)."""
        interval_ms = int(self.settings.reconcile_interval * 1000)
        if not self.redis.set(self.lock_key, self.token, nx=True, px=interval_ms):
            return None
        return self.sweep()

    def sweep(self, at: float | None = None) -> Sweep:
        at = time.time() if at is None else at
        report = Sweep()
        live = self.store.live()
        report.live = len(live)
        carried = message_job_ids(self.redis, at - UNACKED_LEASES * self.settings.lease_seconds)
        suspects = {k.decode(): float(v) for k, v in self.redis.hgetall(self.suspects_key).items()}
        orphans = set()
        for job_id in live:
            job = self.store.get(job_id)
            if job is None or job.final:  # a record lost with a Redis crash, or a stale index entry
                self.redis.srem(self.store.live_key, job_id)
                continue
            lost = not self.store.leased(job_id) and (job.status == "running" or job_id not in carried)
            if not lost:
                continue
            orphans.add(job_id)
            first = suspects.get(job_id)
            if first is None:
                self.redis.hset(self.suspects_key, job_id, at)
            elif at - first >= self.settings.lease_seconds:
                self._recover(job.kind, job.status, job_id, report)
                orphans.discard(job_id)
        gone = [job_id for job_id in suspects if job_id not in orphans]
        if gone:
            self.redis.hdel(self.suspects_key, *gone)
        report.suspects = len(orphans)
        return report

    def _recover(self, kind: str, status: str, job_id: str, report: Sweep) -> None:
        if status == "running":
            if self.store.transition(job_id, ("running",), "queued", unleased=True) != "running":
                return  # its holder came back, or it ended, between the look and now
            reason = "worker_lost"
        else:
            reason = "message_lost"
        self.send(kind, job_id)
        report.recovered.append((job_id, kind, reason))
        log.warning("job %s re-enqueued (%s)", job_id, reason, extra={"job_id": job_id, "kind": kind})


def delete_expired_artifacts(
    store: JobStore, artifacts: ArtifactStore, scratch: Path, min_age: float, at: float | None = None
) -> list[str]:
    """Delete what jobs whose records have expired left: their objects in the artifact store (`jobs/<id>/`: images)
    and their folders in this worker's scratch `scratch` (a failed training's checkpoint). Returns their ids.

    Only jobs with nothing newer than `min_age` seconds: a job's record always exists before its files.
    """
    at = time.time() if at is None else at
    newest: dict[str, float] = {}
    for item in artifacts.list("jobs/"):
        job_id = item.key.split("/")[1]
        newest[job_id] = max(newest.get(job_id, 0.0), item.modified)
    for folder in scratch.iterdir() if scratch.is_dir() else ():
        if folder.is_dir():
            newest[folder.name] = max(newest.get(folder.name, 0.0), folder.stat().st_mtime)
    removed = []
    for job_id, modified in sorted(newest.items()):
        if at - modified > min_age and store.get(job_id) is None:
            artifacts.delete_prefix(f"jobs/{job_id}/")
            shutil.rmtree(scratch / job_id, ignore_errors=True)
            removed.append(job_id)
    return removed
