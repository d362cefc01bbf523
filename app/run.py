"""`make run` (`python -m app.run`): the gateway and a worker per queue (generation, training) on this machine.

Redis: `REDIS_URL` if set, else one answering on localhost:6379, else an embedded redis-server
(data under var/redis). Ctrl-C (SIGINT) or SIGTERM stops the workers (warm: the running job
finishes or is handed back), then the gateway, then the embedded Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .contract.kinds import QUEUES
from .embedded_redis import LOCAL_URL, EmbeddedRedis, answers, free_port


def say(message: str) -> None:
    print(f"[harmonica] {message}", flush=True)


def choose_redis(data_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    configured = os.environ.get("REDIS_URL")
    if configured:
        if not answers(configured):
            raise SystemExit(f"[harmonica] REDIS_URL={configured} does not answer; start it or unset REDIS_URL")
        say(f"Redis: {configured} (from REDIS_URL)")
        return configured, None
    if answers(LOCAL_URL):
        say(f"Redis: {LOCAL_URL} (answering on localhost)")
        return LOCAL_URL, None
    embedded = EmbeddedRedis(data_dir).start()
    say(f"Redis: none configured or on localhost; started an embedded redis-server at {embedded.url}")
    return embedded.url, embedded


def wait_for(url: str, processes: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def stop(processes: list[subprocess.Popen[bytes]], timeout: float = 75) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.run", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--data", type=Path, default=Path("var"), help="artifacts and embedded Redis data")
    args = parser.parse_args(argv)

    url, embedded = choose_redis(args.data / "redis")
    env = dict(os.environ, REDIS_URL=url, PYTHONUNBUFFERED="1")
    env.setdefault("HARMONICA_ARTIFACTS_DIR", str(args.data / "artifacts"))
    if not env.get("HARMONICA_API_KEYS") and not env.get("HARMONICA_API_KEYS_FILE"):
        say("no API keys configured: the API is open to anyone who can reach it (fine on localhost)")
    python = sys.executable
    workers = [[python, "-m", "worker", "--queues", queue, "--metrics-port", str(free_port())] for queue in QUEUES]
    gateway = [python, "-m", "uvicorn", "app.main:app", "--host", args.host, "--port", str(args.port)]
    processes: list[subprocess.Popen[bytes]] = []
    interrupted = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        # Own sessions: a terminal's Ctrl-C reaches only this launcher, which stops the rest in order.
        # Workers get SIGTERM as Celery's soft shutdown: a running job gets 60 s, then returns to the queue.
        worker_env = dict(env, REMAP_SIGTERM="SIGQUIT")
        # the generation and training workers share this machine's cores rather than each taking them all
        cores = len(os.sched_getaffinity(0))
        worker_env.setdefault("HARMONICA_TORCH_THREADS", str(max(1, cores // len(workers))))
        processes = [subprocess.Popen(command, env=worker_env, start_new_session=True) for command in workers]
        processes.append(subprocess.Popen(gateway, env=env, start_new_session=True))
        base = f"http://{args.host}:{args.port}"
        if not wait_for(f"{base}/readyz", processes, timeout=180):
            say("the gateway or a worker did not come up; see the messages above")
            return 1
        say(f"ready. OpenAPI docs: {base}/docs   metrics: {base}/metrics   (Ctrl-C stops everything)")
        say(
            "try:\n  curl -s -X POST " + base + "/generate -H 'Content-Type: application/json' \\\n"
            '    -d \'{"class_labels": [0,1,2,3], "steps": 20, "acceleration": {"method": "harmonica", '
            '"router_id": "builtin-digits-image-ddim-t20-x2"}}\'\n  curl -s ' + base + "/jobs/<id>   then   curl -s -o "
            "digit.png " + base + "/jobs/<id>/images/0"
        )
        while not interrupted:
            if any(p.poll() is not None for p in processes):
                say("a service process exited unexpectedly; stopping")
                return 1
            time.sleep(0.2)
        say("stopping: workers first (a running job finishes or returns to the queue), then the gateway")
        return 0
    finally:
        stop(processes[:-1])
        stop(processes[-1:])
        if embedded is not None:
            embedded.stop()
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
