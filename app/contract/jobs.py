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

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "canceled")
JSON_FIELDS = ("request", "progress", "result", "error")
EVENT_WAIT_MS = 2000  # the longest one read of a job's event log blocks: well under the clients' socket timeout

# Every script below keeps four indexes in step with the record, in the same atomic call:
#   {prefix}active:{owner}  queued or running jobs of one owner (the per-key limit)
#   {prefix}queued:{kind}   queued jobs of one kind (the queue-depth limit; a kind has one queue)
#   {prefix}live            every queued or running job (what the reconciler sweeps)
#   {prefix}jobs:{owner}    the owner's jobs by creation time (listing)
#   {prefix}batch:{key}     queued jobs that may share a denoising batch, by creation time (a job with a
#                           `batch_key`: equal keys mean equal model, sampler, steps, guidance, size and plan)
# and append to the job's event log, {prefix}job:{id}:events: a Redis stream of every state it entered and
# every progress report, whose entry ids are the Server-Sent Events ids of GET /jobs/{id}/events (so a
# client resumes after the last one it saw). It expires with the record.

# Appends one event (JSON) to a job's log; a final state gives the log the record's TTL.
_EVENTS = """
local function emit(key, event, ttl)
  redis.call('XADD', key .. ':events', 'MAXLEN', '~', 10000, '*', 'event', event)
  if ttl and tonumber(ttl) > 0 then redis.call('EXPIRE', key .. ':events', ttl) end
end
local function state_event(status)
  return '{"type": "state", "status": "' .. status .. '"}'
end
-- Schedules the job's webhook for `event` (a final state, or 'progress' if the job asked for progress) unless
-- one is pending already, due now by the server's clock (`webhooks.py` delivers it).
local function notify(prefix, key, id, event)
  local url = redis.call('HGET', key, 'webhook')
  if not url or url == '' then return end
  if event == 'progress' and redis.call('HGET', key, 'webhook_progress') ~= '1' then return end
  local now = redis.call('TIME')
  redis.call('ZADD', prefix .. 'webhooks', 'NX', now[1] + now[2] / 1e6, id .. ':' .. event)
end
"""

# Where a job waits to share a batch: maintained with the queued set by every script that moves a job.
_BATCH_INDEX = """
local function batch_index(prefix, key, id, queued)
  local batch = redis.call('HGET', key, 'batch_key')
  if not batch or batch == '' then return end
  if queued then
    redis.call('ZADD', prefix .. 'batch:' .. batch, redis.call('HGET', key, 'created_at'), id)
  else
    redis.call('ZREM', prefix .. 'batch:' .. batch, id)
  end
end
"""

# KEYS[1] job hash, KEYS[2] owner index, KEYS[3] owner active set, KEYS[4] live set, KEYS[5] queued set;
# ARGV[1] per-owner limit, ARGV[2] queue limit, ARGV[3] job id, ARGV[4] created_at, ARGV[5] key prefix,
# ARGV[6..] fields. Checks both limits and creates the job in one step, so no burst gets past a limit.
_ADMIT = (
    _BATCH_INDEX
    + _EVENTS
    + """
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[1]) then return 'key_busy' end
if redis.call('SCARD', KEYS[5]) >= tonumber(ARGV[2]) then return 'queue_full' end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('SADD', KEYS[5], ARGV[3])
batch_index(ARGV[5], KEYS[1], ARGV[3], true)
emit(KEYS[1], state_event('queued'))
return 'ok'
"""
)

# KEYS[1] job hash; ARGV[1] allowed current states (comma-separated), ARGV[2] new state,
# ARGV[3] TTL in seconds once final (0: not final), ARGV[4] key prefix, ARGV[5] '1' if the job's lease
# must be absent (the reconciler's requeue: never take a job from a live holder), ARGV[6] the event to log
# (JSON; '': the new state's, if it is new), ARGV[7..] field/value pairs. Returns the state found.
_TRANSITION = (
    _BATCH_INDEX
    + _EVENTS
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1] .. ':lease') == 1 then return current end
for state in string.gmatch(ARGV[1], '[^,]+') do
  if state == current then
    local id, kind = redis.call('HGET', KEYS[1], 'id'), redis.call('HGET', KEYS[1], 'kind')
    redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 7))
    if ARGV[2] == 'queued' then
      redis.call('SADD', ARGV[4] .. 'queued:' .. kind, id)
    else
      redis.call('SREM', ARGV[4] .. 'queued:' .. kind, id)
    end
    batch_index(ARGV[4], KEYS[1], id, ARGV[2] == 'queued')
    if ARGV[6] ~= '' then
      emit(KEYS[1], ARGV[6], ARGV[3])
      notify(ARGV[4], KEYS[1], id, 'progress')
    elseif ARGV[2] ~= current then
      emit(KEYS[1], state_event(ARGV[2]), ARGV[3])
    end
    if tonumber(ARGV[3]) > 0 then notify(ARGV[4], KEYS[1], id, ARGV[2]) end
    if tonumber(ARGV[3]) > 0 then
      redis.call('EXPIRE', KEYS[1], ARGV[3])
      redis.call('SREM', ARGV[4] .. 'active:' .. redis.call('HGET', KEYS[1], 'owner'), id)
      redis.call('SREM', ARGV[4] .. 'live', id)
    end
    return current
  end
end
return current
"""
)

# KEYS[1] lease key; ARGV[1] owner token; ARGV[2] TTL in ms. Renews the owner's own lease, and takes it
# back if it expired meanwhile (Redis was away longer than the lease); 0 if another holder has it.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0 end
return 0
"""
# KEYS[1] batch index; ARGV[1] rows left in the batch, ARGV[2] key prefix, ARGV[3] lease token, ARGV[4] lease
# TTL in ms, ARGV[5] started_at. Takes the oldest queued, unleased, uncanceled jobs of the index that fit the
# rows left, as one more delivery of each: leased to the caller, running, out of the queued indexes.
_CLAIM = (
    _BATCH_INDEX
    + _EVENTS
    + """
local claimed, left = {}, tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[2] .. 'job:' .. id
  local status = redis.call('HGET', key, 'status')
  if status ~= 'queued' then
    redis.call('ZREM', KEYS[1], id)
  elseif redis.call('EXISTS', key .. ':lease') == 0 and redis.call('HGET', key, 'cancel_requested') ~= '1' then
    local rows = tonumber(redis.call('HGET', key, 'batch_rows'))
    if rows <= left then
      left = left - rows
      redis.call('SET', key .. ':lease', ARGV[3], 'PX', ARGV[4])
      redis.call('HSET', key, 'status', 'running')
      local started = redis.call('HGET', key, 'started_at')
      if not started or started == '' then redis.call('HSET', key, 'started_at', ARGV[5]) end
      redis.call('HINCRBY', key, 'deliveries', 1)
      redis.call('SREM', ARGV[2] .. 'queued:' .. redis.call('HGET', key, 'kind'), id)
      batch_index(ARGV[2], key, id, false)
      emit(key, state_event('running'))
      table.insert(claimed, id)
    end
  end
end
return claimed
"""
)
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
    batch_key: str | None = None  # jobs with equal keys may share a denoising batch (generation)
    batch_rows: int = 0  # the transformer rows it adds to a batch
    webhook: str | None = None  # called as the job ends (`webhooks.py`)
    webhook_progress: bool = False  # ... and as it progresses

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
            cancel_requested=data.get("cancel_requested") == "1", batch_key=data.get("batch_key") or None,
            batch_rows=int(data.get("batch_rows") or 0), webhook=data.get("webhook") or None,
            webhook_progress=data.get("webhook_progress") == "1",
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
        self._admit = client.register_script(_ADMIT)
        self._transition = client.register_script(_TRANSITION)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _index(self, owner: str) -> str:
        return f"{self.prefix}jobs:{owner}"

    def _active(self, owner: str) -> str:
        return f"{self.prefix}active:{owner}"

    def _queued(self, kind: str) -> str:
        return f"{self.prefix}queued:{kind}"

    def _lease(self, job_id: str) -> str:
        return f"{self._key(job_id)}:lease"  # the transition script derives the same name from the job key

    def admit(self, job: Job, max_active: int, max_queued: int) -> str | None:
        """Create the queued job unless its owner has `max_active` jobs queued or running, or its kind
        `max_queued` jobs queued; returns the refusal (`key_busy`, `queue_full`) or None. Atomic."""
        keys = [self._key(job.id), self._index(job.owner), self._active(job.owner), self.live_key,
                self._queued(job.kind)]  # fmt: skip
        args = [max_active, max_queued, job.id, job.created_at, self.prefix, *_flatten(job.__dict__)]
        found = self._admit(keys=keys, args=args)
        return None if found == b"ok" else found.decode()

    @property
    def live_key(self) -> str:
        return f"{self.prefix}live"

    def live(self) -> list[str]:
        """Ids of every queued or running job."""
        return [raw.decode() for raw in self.redis.smembers(self.live_key)]

    def active(self, owner: str) -> int:
        """How many of the owner's jobs are queued or running."""
        return int(self.redis.scard(self._active(owner)))

    def queued(self, kind: str) -> int:
        """How many jobs of a kind wait to run."""
        return int(self.redis.scard(self._queued(kind)))

    def get(self, job_id: str) -> Job | None:
        data = self.redis.hgetall(self._key(job_id))
        return Job.from_hash({k.decode(): v.decode() for k, v in data.items()}) if data else None

    def list(self, owner: str, limit: int, before: float | None = None) -> tuple[list[Job], float | None]:
        """A page of an owner's jobs, newest first, and the cursor of the next page (None: last page).

        The cursor is the creation time of the page's last job; expired records leave the index here.
        """
        index = self._index(owner)
        high = "+inf" if before is None else f"({before!r}"
        # One entry more than the page tells whether another page exists (no link to an empty page).
        entries = self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=limit + 1, withscores=True)
        more = len(entries) > limit
        jobs = []
        for raw, _ in entries[:limit]:
            job = self.get(raw.decode())
            if job is None:
                self.redis.zrem(index, raw)
            else:
                jobs.append(job)
        return jobs, (entries[limit - 1][1] if more else None)

    def transition(
        self, job_id: str, allowed: tuple[str, ...], status: str, unleased: bool = False, **fields: Any
    ) -> str | None:
        """Set `status` (and fields) if the job is in one of `allowed` (and, with `unleased`, nobody holds its
        lease); returns the state found (None: no job)."""
        ttl = self.ttl if status in FINAL_STATES else 0
        if status in FINAL_STATES:
            fields.setdefault("finished_at", now())
        args = [",".join(allowed), status, ttl, self.prefix, "1" if unleased else "0", "", *_flatten(fields)]
        found = self._transition(keys=[self._key(job_id)], args=args)
        return found.decode() if found else None

    def report_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Set a running job's progress and log it as an event; a no-op once the job is final."""
        event = json.dumps({"type": "progress", **progress})
        args = ["running", "running", 0, self.prefix, "0", event, *_flatten({"progress": progress})]
        self._transition(keys=[self._key(job_id)], args=args)

    def due_webhooks(self, limit: int = 50) -> list[tuple[str, int]]:
        """Claim webhook deliveries that are due (one claimer each): their `<job id>:<event>` and attempt count."""
        key, attempts = f"{self.prefix}webhooks", f"{self.prefix}webhook-attempts"
        seconds, micros = self.redis.time()
        claimed = []
        for raw in self.redis.zrangebyscore(key, "-inf", seconds + micros / 1e6, start=0, num=limit):
            if self.redis.zrem(key, raw):
                claimed.append((raw.decode(), int(self.redis.hget(attempts, raw) or 0)))
                self.redis.hdel(attempts, raw)
        return claimed

    def schedule_webhook(self, member: str, delay: float, attempt: int) -> None:
        """Try a delivery again in `delay` seconds as attempt number `attempt` (counted from 0)."""
        seconds, micros = self.redis.time()
        pipe = self.redis.pipeline()
        pipe.hset(f"{self.prefix}webhook-attempts", member, attempt)
        pipe.zadd(f"{self.prefix}webhooks", {member: seconds + micros / 1e6 + delay})
        pipe.execute()

    def wait_final(self, job_id: str, seconds: float) -> Job | None:
        """The job once it is final, or as it is after `seconds`; woken by its event log, not by polling."""
        deadline, after = time.monotonic() + seconds, "0"
        while True:
            job = self.get(job_id)
            left = deadline - time.monotonic()
            if job is None or job.final or left <= 0:
                return job
            events = self.events(job_id, after, block_ms=max(1, min(int(left * 1000), EVENT_WAIT_MS)))
            after = events[-1][0] if events else after

    def events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The job's events after event id `after` ("0": from the first), oldest first, as (id, event); with
        `block_ms`, waits that long for one when there is none yet."""
        found = self.redis.xread({f"{self._key(job_id)}:events": after}, count=500, block=block_ms)
        return [(raw.decode(), json.loads(fields[b"event"])) for raw, fields in (found[0][1] if found else [])]

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
    def leased(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._lease(job_id)))

    def acquire_lease(self, job_id: str, token: str, seconds: float) -> bool:
        return bool(self.redis.set(self._lease(job_id), token, nx=True, px=int(seconds * 1000)))

    def renew_lease(self, job_id: str, token: str, seconds: float) -> bool:
        return bool(self._renew(keys=[self._lease(job_id)], args=[token, int(seconds * 1000)]))

    def release_lease(self, job_id: str, token: str) -> None:
        self._release(keys=[self._lease(job_id)], args=[token])

    def claim_batch(self, batch_key: str, rows: int, token: str, seconds: float) -> list[str]:
        """Take queued jobs that may join a batch (oldest first, up to `rows` transformer rows in all): each is
        leased to `token`, running and one delivery further, atomically; returns their ids."""
        args = [rows, self.prefix, token, int(seconds * 1000), now()]
        return [raw.decode() for raw in self._claim(keys=[f"{self.prefix}batch:{batch_key}"], args=args)]

    # Worker heartbeats, read by /readyz and the workers gauge. A heartbeat carries the models the
    # worker's pool process has loaded, so readiness means "model resident", not just "process up", and
    # their weights' fingerprints, against which the gateway checks an uploaded router.
    # Both keys expire unless the parent's heartbeat renews them, so a killed worker leaves nothing behind.
    def mark_loaded(self, worker: str, fingerprints: dict[str, str], seconds: float) -> None:
        """Record the models a worker has loaded, each with its `Model.fingerprint`."""
        self.redis.set(f"{self.prefix}loaded:{worker}", json.dumps(fingerprints), ex=max(1, int(seconds)))

    def heartbeat(self, worker: str, queues: list[str], seconds: float) -> None:
        ttl = max(1, int(seconds))
        loaded_key = f"{self.prefix}loaded:{worker}"
        loaded = self.redis.get(loaded_key)
        fingerprints = json.loads(loaded) if loaded else {}
        state = {"queues": queues, "models": list(fingerprints), "fingerprints": fingerprints, "at": now()}
        pipe = self.redis.pipeline()
        pipe.set(f"{self.prefix}worker:{worker}", json.dumps(state), ex=ttl)
        pipe.expire(loaded_key, ttl)
        pipe.execute()

    def forget_worker(self, worker: str) -> None:
        self.redis.delete(f"{self.prefix}worker:{worker}", f"{self.prefix}loaded:{worker}")

    def workers(self) -> dict[str, dict[str, Any]]:
        """Live workers by name: the queues they consume, the models they have loaded and their fingerprints."""
        found = {}
        for key in self.redis.scan_iter(match=f"{self.prefix}worker:*", count=100):
            raw = self.redis.get(key)
            if raw:
                state = json.loads(raw)
                fields = ("queues", "models", "fingerprints")
                found[key.decode().split(":worker:", 1)[1]] = {name: state.get(name, {}) for name in fields}
        return found
