"""Chaos benchmark: does every accepted job still end exactly once when workers and Redis crash?

It starts its own service on loopback (an embedded redis-server with AOF everysec on a fixed port, the
gateway, `--workers` generation workers, each in its own process group), submits small `digits`
generation jobs at `--rate` per second for `--duration` seconds (each with an Idempotency-Key, a POST
retried on a connection error, 409 or 503), and meanwhile, at random moments, SIGKILLs pool children
and whole workers (`--kills` in all, `--worker-kills` of them whole workers, each replaced at once)
and kill -9s Redis, restarting it on the same port and data after `--redis-down` seconds
(`--redis-restarts` times). Then it waits up to `--settle-timeout` seconds for every job to be final.

It measures, per accepted job (a 202): final (by status), stuck (not final at the deadline), lost
(`GET /jobs/{id}` is 404), duplicated (a succeeded job whose folder `jobs/<id>/` holds other files
than its result lists, or a file written after the job was final, i.e. by a second run), and the
time from the end of the chaos until every job was final.

    .venv/bin/python bench/chaos.py                     # 300 s, 24 kills, 3 Redis restarts
    .venv/bin/python bench/chaos.py --duration 60 --kills 6 --redis-restarts 1
    # prints a table, writes bench/results/chaos.json; exit code 1 if a job is stuck, lost or duplicated

Everything it starts is killed at the end (also on Ctrl-C) and its temporary folder is deleted
(`--keep` keeps it, with the gateway's and workers' logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from service_load import FINAL, call, cpu_model  # noqa: E402

from app.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from tests.servicekit import Worker, wait_until  # noqa: E402

ROUTER = "builtin-digits-iepo-ddim-t20"
# The service's defaults (visibility timeout 7 h among them) except what recovery from a crash needs.
SERVICE_ENV = {
    "HARMONICA_LEASE_SECONDS": "5",
    "HARMONICA_RECONCILE_INTERVAL": "3",
    "HF_HUB_OFFLINE": "1",
    "HARMONICA_TORCH_THREADS": "1",  # one torch thread per process: the machine has few cores
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def say(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def job_body(rng: random.Random) -> dict[str, Any]:
    """A small generation: 1-4 digits, 10-20 steps, no cache, FORA or the built-in T=20 router."""
    method = rng.choice(["none", "fora", "harmonica"])
    acceleration: dict[str, Any] = {"method": method}
    if method == "fora":
        acceleration["interval"] = rng.choice([2, 3])
    if method == "harmonica":
        acceleration["router_id"] = ROUTER
    steps = 20 if method == "harmonica" else rng.randint(10, 20)
    labels = rng.sample(range(10), rng.randint(1, 4))
    return {"model": "digits", "class_labels": labels, "num_images": 1, "steps": steps,
            "seed": rng.randrange(2**32), "acceleration": acceleration}  # fmt: skip


def post_job(url: str, body: dict[str, Any], retries: int) -> tuple[int, dict[str, Any] | None, int]:
    """POST with one Idempotency-Key for all tries; retried on a connection error, 409 or 503 with backoff.
    Returns (last status, 0 for no answer; the job on a 202; tries)."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
    status = 0
    for attempt in range(1, retries + 2):
        try:
            request = urllib.request.Request(url, json.dumps(body).encode(), headers)
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read()), attempt
        except urllib.error.HTTPError as error:
            status = error.code
            if status not in (409, 503):
                return status, None, attempt
        except OSError:  # refused, reset or timed out: the request may or may not have been accepted
            status = 0
        time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
    return status, None, retries + 1


@dataclass
class Submissions:
    """What the submitting thread did: accepted job ids and the other outcomes."""

    accepted: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)  # final status of a POST that got no 202
    retried: int = 0  # POSTs that needed more than one try
    done: threading.Event = field(default_factory=threading.Event)


def submit_jobs(
    base: str, args: argparse.Namespace, rng: random.Random, out: Submissions, stop: threading.Event
) -> None:
    """Open-model (Poisson) arrivals as in service_load.py, for `args.duration` seconds."""
    start = next_at = time.monotonic()
    try:
        while next_at < start + args.duration and not stop.is_set():
            stop.wait(max(0.0, next_at - time.monotonic()))
            status, job, tries = post_job(f"{base}/generate", job_body(rng), args.post_retries)
            out.retried += tries > 1
            if status == 202 and job is not None:
                out.accepted.append(job["id"])
            else:
                out.refused[str(status or "no answer")] += 1
            next_at = max(next_at + rng.expovariate(args.rate), time.monotonic() - 1)
    finally:
        out.done.set()


class Service:
    """The embedded Redis, the gateway and the generation workers this benchmark started, and their chaos."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.redis = EmbeddedRedis(tmp / "redis", port=free_port())
        self.artifacts = tmp / "artifacts"
        self.env = {"REDIS_URL": self.redis.url, "HARMONICA_ARTIFACTS_DIR": str(self.artifacts), **SERVICE_ENV}
        self.size = workers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.gateway_log = tmp / "gateway.log"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.live: list[Worker] = []  # the current generation workers
        self.started: list[Worker] = []  # every worker ever started, for the cleanup
        self.counts: Counter[str] = Counter()

    def start(self, timeout: float = 240) -> None:
        self.redis.start()
        client = redis.Redis.from_url(self.redis.url)
        with self.gateway_log.open("ab") as log:
            command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                       "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
            self.gateway = subprocess.Popen(command, env=dict(os.environ, **self.env), cwd=ROOT, stdout=log,
                                            stderr=log, start_new_session=True)  # fmt: skip
        for _ in range(self.size):
            self.add_worker().start(client, timeout)
        wait_until(lambda: call(f"{self.base}/readyz")[0] == 200, timeout, f"/readyz (log: {self.gateway_log})",
                   interval=0.5, processes=(self.gateway,))  # fmt: skip

    def add_worker(self) -> Worker:
        worker = Worker(self.env, queues="gen", name="chaos-gen")
        self.started.append(worker)
        self.live.append(worker)
        return worker

    def replace(self, dead: Worker) -> None:
        """A new worker instead of `dead`, started in the background (its model loads while chaos goes on)."""
        self.live.remove(dead)
        worker = self.add_worker()
        client = redis.Redis.from_url(self.redis.url)

        def start() -> None:
            try:
                worker.start(client, timeout=240)
            except Exception as error:  # Redis down meanwhile, killed, or slow: the process (if any) runs on
                if worker in self.live and worker.process is not None and worker.process.poll() is None:
                    say(f"replacement worker {worker.name} not up yet: {type(error).__name__}: {error}")

        threading.Thread(target=start, daemon=True).start()
        deadline = time.monotonic() + 10
        while worker.process is None and time.monotonic() < deadline:  # spawned before stop() can look for it
            time.sleep(0.01)

    def check(self) -> None:
        """Replace a worker that exited by itself (count it: the service should not do that)."""
        for worker in list(self.live):
            if worker.process is not None and worker.process.poll() is not None:
                say(f"worker {worker.name} exited by itself ({worker.process.returncode}); replacing it")
                self.counts["worker_exits"] += 1
                self.replace(worker)
        if self.gateway is not None and self.gateway.poll() is not None:
            raise RuntimeError(f"the gateway exited ({self.gateway.returncode}); log: {self.gateway_log}")

    def kill_child(self, wait: float = 30) -> bool:
        """SIGKILL one pool child of a random worker (waits for a worker that has one)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            children = [child for worker in self.live if worker.process is not None for child in worker.children()]
            if children:
                child = random.choice(children)
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    continue
                self.counts["child_kills"] += 1
                say(f"SIGKILL pool child {child.pid}")
                return True
            time.sleep(0.5)
        say("no pool child to kill")
        return False

    def kill_worker(self) -> None:
        """killpg SIGKILL a random worker (parent and child die without cleanup), then start a replacement."""
        running = [w for w in self.live if w.process is not None and w.process.poll() is None]
        running = [w for w in running if w.children()] or running  # rather one that can run jobs
        if not running:
            say("no running worker to kill")
            return
        worker = random.choice(running)
        worker.kill()
        self.counts["worker_kills"] += 1
        say(f"SIGKILL worker {worker.name} (process group {worker.process.pid if worker.process else '?'})")
        self.replace(worker)

    def restart_redis(self, down: float) -> None:
        self.redis.kill()
        say(f"kill -9 redis-server; down for {down:g} s")
        time.sleep(down)
        self.redis.start(timeout=30)
        self.counts["redis_restarts"] += 1
        say("redis-server restarted on the same port and data")

    def stop(self) -> None:
        """SIGKILL everything this benchmark started: nothing of it needs a clean shutdown."""
        for process in [w.process for w in self.started] + [self.gateway]:
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.redis.kill()


def chaos(service: Service, args: argparse.Namespace, rng: random.Random, submissions: Submissions) -> None:
    """The kills and Redis restarts at random moments of the submission window, in random order."""
    events = ["worker"] * args.worker_kills + ["child"] * (args.kills - args.worker_kills)
    events += ["redis"] * args.redis_restarts
    rng.shuffle(events)
    start = time.monotonic()
    moments = sorted(rng.uniform(0.05, 0.95) * args.duration for _ in events)
    for moment, event in zip(moments, events, strict=True):
        while time.monotonic() < start + moment:
            service.check()
            time.sleep(min(0.5, max(0.0, start + moment - time.monotonic())))
        if event == "child":
            service.kill_child()
        elif event == "worker":
            service.kill_worker()
        else:
            service.restart_redis(args.redis_down)
    while not submissions.done.wait(0.5):
        service.check()


def settle(
    service: Service, ids: list[str], timeout: float
) -> tuple[dict[str, dict[str, Any]], set[str], float | None]:
    """Poll every job until it is final or 404, or the deadline. Returns the last records, the 404 ids and
    the seconds until all were final (None if some never were)."""
    start = time.monotonic()
    records: dict[str, dict[str, Any]] = {}
    missing: set[str] = set()
    pending = set(ids)
    while pending and time.monotonic() < start + timeout:
        service.check()
        for job_id in sorted(pending):
            try:
                status, job = call(f"{service.base}/jobs/{job_id}")
            except OSError:
                continue
            if status == 404:
                missing.add(job_id)
            elif status == 200:
                records[job_id] = job
                missing.discard(job_id)
            if status == 404 or (status == 200 and job["status"] in FINAL):
                pending.discard(job_id)
        if pending:
            time.sleep(1)
    return records, missing, (time.monotonic() - start if not pending else None)


def duplicated(job: dict[str, Any], service: Service) -> str | None:
    """Why a succeeded job looks as if it ran twice, or None: the folder's files are the result's, and none
    was written after the job was final."""
    folder = service.artifacts / "jobs" / job["id"]
    listed = {*job["result"].get("images", []), job["result"].get("grid", "")} - {""}
    found = {path.name: path.stat().st_mtime for path in folder.iterdir()} if folder.is_dir() else {}
    if set(found) != listed:
        return f"files {sorted(set(found) ^ listed)} differ from the result"
    late = [name for name, mtime in found.items() if mtime > job["finished_at"] + 0.5]
    return f"{late} written after the job was final" if late else None


def report(service: Service, submissions: Submissions, records: dict[str, dict[str, Any]], missing: set[str],
           settle_s: float | None) -> dict[str, Any]:  # fmt: skip
    """The outcome of every accepted job, and what the chaos did."""
    final = {i: job for i, job in records.items() if job["status"] in FINAL and i not in missing}
    stuck = {i: f"{records[i]['status']}, {records[i]['deliveries']} deliveries" if i in records else "never read"
             for i in submissions.accepted if i not in final and i not in missing}  # fmt: skip
    dupes = {i: why for i, job in final.items() if job["status"] == "succeeded" and (why := duplicated(job, service))}
    failed = [job for job in final.values() if job["status"] == "failed"]
    return {
        "submitted": len(submissions.accepted),
        "post_refused": dict(submissions.refused),
        "post_retried": submissions.retried,
        "final": dict(Counter(job["status"] for job in final.values())),
        "failed_by_code": dict(Counter(str((job.get("error") or {}).get("code")) for job in failed)),
        "redelivered": sum(job.get("deliveries", 0) > 1 for job in final.values()),
        "stuck": len(stuck),
        "lost": len(missing),
        "duplicated": len(dupes),
        "child_kills": service.counts["child_kills"],
        "worker_kills": service.counts["worker_kills"],
        "worker_self_exits": service.counts["worker_exits"],
        "redis_restarts": service.counts["redis_restarts"],
        "settle_s": None if settle_s is None else round(settle_s, 1),
        "stuck_jobs": dict(list(stuck.items())[:20]),
        "lost_jobs": sorted(missing)[:20],
        "duplicated_jobs": dict(list(dupes.items())[:20]),
    }


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("jobs submitted (202)", result["submitted"]),
        ("POSTs refused (status: count)", result["post_refused"] or 0),
        ("POSTs retried", result["post_retried"]),
        ("final", sum(result["final"].values())),
        *((f"  {status}", count) for status, count in sorted(result["final"].items())),
        *((f"    failed: {code}", count) for code, count in sorted(result["failed_by_code"].items())),
        ("  delivered more than once", result["redelivered"]),
        ("stuck (not final at the deadline)", result["stuck"]),
        ("lost (202, then 404)", result["lost"]),
        ("duplicated", result["duplicated"]),
        ("pool children SIGKILLed", result["child_kills"]),
        ("whole workers SIGKILLed", result["worker_kills"]),
        ("workers that exited by themselves", result["worker_self_exits"]),
        ("Redis kill -9 + restarts", result["redis_restarts"]),
        ("time to settle (s)", "never" if result["settle_s"] is None else result["settle_s"]),
        ("device", result["device"]),
        ("command", result["command"]),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for name in ("stuck_jobs", "lost_jobs", "duplicated_jobs"):
        if result[name]:
            print(f"{name}: {json.dumps(result[name])}")


def interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # Ctrl-C and SIGTERM end the run through the cleanup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of submissions and chaos")
    parser.add_argument("--rate", type=float, default=0.5, help="job arrivals per second (Poisson)")
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs in all (pool children and whole workers)")
    parser.add_argument("--worker-kills", type=int, help="of --kills, whole workers (default: half)")
    parser.add_argument("--redis-restarts", type=int, default=3, help="kill -9 and restarts of redis-server")
    parser.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis stays down each time")
    parser.add_argument("--workers", type=int, default=2, help="generation workers (concurrency 1 each)")
    parser.add_argument("--settle-timeout", type=float, default=240.0, help="seconds to wait for final states")
    parser.add_argument("--post-retries", type=int, default=5, help="retries of a POST without an answer or a 503")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, Redis data, images)")
    args = parser.parse_args()
    args.worker_kills = args.kills // 2 if args.worker_kills is None else min(args.worker_kills, args.kills)
    if args.workers < 2:
        parser.error("--workers must be at least 2 (one survives while another is replaced)")
    command = shlex.join(["python", "bench/chaos.py", *sys.argv[1:]])
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each worker makes its own
    for signum in (signal.SIGINT, signal.SIGTERM):  # also where SIGINT came in ignored (a background job)
        signal.signal(signum, interrupt)
    rng = random.Random(args.seed)
    random.seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="harmonica-chaos-"))
    service = Service(tmp, args.workers)
    stop = threading.Event()
    try:
        say(f"starting redis-server on :{service.redis.port}, the gateway on :{service.port}, {args.workers} workers")
        service.start()
        say(f"ready; submitting {args.rate:g} jobs/s for {args.duration:g} s with {args.kills} kills "
            f"({args.worker_kills} whole workers) and {args.redis_restarts} Redis restarts")  # fmt: skip
        submissions = Submissions()
        submitter = threading.Thread(
            target=submit_jobs, args=(service.base, args, random.Random(args.seed + 1), submissions, stop), daemon=True
        )
        submitter.start()
        chaos(service, args, rng, submissions)
        say(f"chaos over; waiting up to {args.settle_timeout:g} s for {len(submissions.accepted)} jobs to be final")
        records, missing, settle_s = settle(service, submissions.accepted, args.settle_timeout)
        result = {"command": command, "device": f"{cpu_model()}, {os.cpu_count()} CPUs",
                  "settings": {**SERVICE_ENV, "workers": args.workers, "visibility_timeout": "default (7 h)"},
                  **report(service, submissions, records, missing, settle_s)}  # fmt: skip
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    finally:
        stop.set()
        service.stop()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 1 if result["stuck"] or result["lost"] or result["duplicated"] else 0


if __name__ == "__main__":
    sys.exit(main())
