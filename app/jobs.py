"""The authoritative job record: one Redis hash per job, moved through its states by atomic scripts.

Celery's own result states are not the API (an unknown id reads as PENDING there). Here a job is
`queued` -> `running` -> `succeeded` | `failed` | `canceled`, and a final state is never
overwritten: every transition is a Lua script that checks the current state first, so a redelivered
or duplicated task cannot undo a result or run beside a live copy (the lease).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

FINAL_STATES = ("succeeded", "failed", "canceled")
KINDS = ("generate", "train_router")
JSON_FIELDS = ("request", "progress", "result", "error")

# KEYS[1] job hash; ARGV[1] allowed current states (comma-separated), ARGV[2] new state,
# ARGV[3] TTL in seconds once final (0: not final), ARGV[4] prefix of the owners' active-job sets,
# ARGV[5..] field/value pairs. Returns the state found.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
for state in string.gmatch(ARGV[1], '[^,]+') do
  if state == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 5))
    if tonumber(ARGV[3]) > 0 then
      redis.call('EXPIRE', KEYS[1], ARGV[3])
      redis.call('SREM', ARGV[4] .. redis.call('HGET', KEYS[1], 'owner'), redis.call('HGET', KEYS[1], 'id'))
    end
    return current
  end
end
return current
"""

# KEYS[1] lease key; ARGV[1] owner token; ARGV[2] TTL in ms. Renews only the owner's own lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def now() -> float:
    return time.time()


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Job:
    id: str
    kind: str
    status: str
    owner: str
    model: str
    request: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    deliveries: int = 0
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Job:
        def number(name: str) -> float | None:
            return float(data[name]) if data.get(name) else None

        decoded = {name: json.loads(data[name]) if data.get(name) else None for name in JSON_FIELDS}
        return cls(
            id=data["id"], kind=data["kind"], status=data["status"], owner=data["owner"], model=data["model"],
            request=decoded["request"] or {}, created_at=float(data["created_at"]), started_at=number("started_at"),
            finished_at=number("finished_at"), progress=decoded["progress"] or {}, result=decoded["result"],
            error=decoded["error"], deliveries=int(data.get("deliveries") or 0),
            cancel_requested=data.get("cancel_requested") == "1",
        )  # fmt: skip


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    """Hash fields as strings: JSON for structured fields, 1/0 for flags, "" for None."""
    encoded = {}
    for name, value in fields.items():
        if name in JSON_FIELDS:
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        encoded[name] = "" if value is None else str(value)
    return encoded


def _flatten(fields: dict[str, Any]) -> list[str]:
    return [part for pair in _encode(fields).items() for part in pair]


class JobStore:
    """Job records, the newest-first index, idempotency keys and run leases, all in one Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "harmonica:", ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl = ttl_seconds
        self._transition = client.register_script(_TRANSITION)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _index(self, owner: str) -> str:
        return f"{self.prefix}jobs:{owner}"

    def _active(self, owner: str = "") -> str:
        return f"{self.prefix}active:{owner}"

    def create(self, job: Job) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self._key(job.id), mapping=_encode(job.__dict__))
        pipe.zadd(self._index(job.owner), {job.id: job.created_at})
        pipe.sadd(self._active(job.owner), job.id)
        pipe.execute()

    def active(self, owner: str) -> int:
        """How many of the owner's jobs are queued or running."""
        return int(self.redis.scard(self._active(owner)))

    def get(self, job_id: str) -> Job | None:
        data = self.redis.hgetall(self._key(job_id))
        return Job.from_hash({k.decode(): v.decode() for k, v in data.items()}) if data else None

    def list(self, owner: str, limit: int, before: float | None = None) -> tuple[list[Job], float | None]:
        """A page of an owner's jobs, newest first, and the cursor of the next page (None: last page).

        The cursor is the creation time of the page's last job; expired records leave the index here.
        """
        index = self._index(owner)
        high = "+inf" if before is None else f"({before!r}"
        entries = self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=limit, withscores=True)
        jobs = []
        for raw, _ in entries:
            job = self.get(raw.decode())
            if job is None:
                self.redis.zrem(index, raw)
            else:
                jobs.append(job)
        return jobs, (entries[-1][1] if len(entries) == limit else None)

    def transition(self, job_id: str, allowed: tuple[str, ...], status: str, **fields: Any) -> str | None:
        """Set `status` (and fields) if the job is in one of `allowed`; returns the state found (None: no job)."""
        ttl = self.ttl if status in FINAL_STATES else 0
        if status in FINAL_STATES:
            fields.setdefault("finished_at", now())
        args = [",".join(allowed), status, ttl, self._active(), *_flatten(fields)]
        found = self._transition(keys=[self._key(job_id)], args=args)
        return found.decode() if found else None

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields of a job that is not final (progress); a no-op once it is."""
        self._transition(keys=[self._key(job_id)], args=["running", "running", 0, "", *_flatten(fields)])

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once; flag a running one (its worker stops at the next step). Returns the state."""
        found = self.transition(job_id, ("queued",), "canceled", cancel_requested=True)
        if found == "running":
            self.redis.hset(self._key(job_id), "cancel_requested", "1")
        return found

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id), "cancel_requested") == b"1"

    def count_delivery(self, job_id: str) -> int:
        return int(self.redis.hincrby(self._key(job_id), "deliveries", 1))

    # Idempotency keys: key -> "job_id fingerprint", kept as long as job records.
    def claim_idempotency_key(self, owner: str, key: str, job_id: str, fingerprint: str) -> tuple[str, str] | None:
        """Bind the key to this job; if it is bound already, return (job_id, fingerprint) of that binding."""
        name = f"{self.prefix}idem:{owner}:{key}"
        if self.redis.set(name, f"{job_id} {fingerprint}", nx=True, ex=self.ttl):
            return None
        existing = self.redis.get(name)
        if existing is None:  # expired between the two calls: claim again
            return self.claim_idempotency_key(owner, key, job_id, fingerprint)
        bound_id, bound_fingerprint = existing.decode().split(" ", 1)
        return bound_id, bound_fingerprint

    def release_idempotency_key(self, owner: str, key: str) -> None:
        self.redis.delete(f"{self.prefix}idem:{owner}:{key}")

    # Leases: one live run per job; the holder renews it while running.
    def acquire_lease(self, job_id: str, token: str, seconds: float) -> bool:
        return bool(self.redis.set(f"{self._key(job_id)}:lease", token, nx=True, px=int(seconds * 1000)))

    def renew_lease(self, job_id: str, token: str, seconds: float) -> bool:
        return bool(self._renew(keys=[f"{self._key(job_id)}:lease"], args=[token, int(seconds * 1000)]))

    def release_lease(self, job_id: str, token: str) -> None:
        self._release(keys=[f"{self._key(job_id)}:lease"], args=[token])

    # Worker heartbeats, read by /readyz and the workers gauge. A heartbeat carries the models the
    # worker's pool process has loaded, so readiness means "model resident", not just "process up".
    def mark_loaded(self, worker: str, models: list[str]) -> None:
        self.redis.set(f"{self.prefix}loaded:{worker}", json.dumps(models))

    def heartbeat(self, worker: str, queues: list[str], seconds: float) -> None:
        loaded = self.redis.get(f"{self.prefix}loaded:{worker}")
        state = {"queues": queues, "models": json.loads(loaded) if loaded else [], "at": now()}
        self.redis.set(f"{self.prefix}worker:{worker}", json.dumps(state), ex=int(seconds))

    def forget_worker(self, worker: str) -> None:
        self.redis.delete(f"{self.prefix}worker:{worker}", f"{self.prefix}loaded:{worker}")

    def workers(self) -> dict[str, dict[str, Any]]:
        """Live workers by name: the queues they consume and the models they have loaded."""
        found = {}
        for key in self.redis.scan_iter(match=f"{self.prefix}worker:*", count=100):
            raw = self.redis.get(key)
            if raw:
                state = json.loads(raw)
                found[key.decode().split(":worker:", 1)[1]] = {"queues": state["queues"], "models": state["models"]}
        return found
