"""`python -m worker`: start a Celery worker for the given queues with its metrics endpoint.

It prepares a clean prometheus-client multiprocess directory (the pool children write their
metrics there; it must be empty at start and set before any import), then execs Celery, so the
process that receives SIGTERM/SIGINT is Celery itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from app.contract.kinds import KINDS, QUEUES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    kinds = ", ".join(f"{kind.queue} ({kind.description})" for kind in KINDS.values())
    parser.add_argument("--queues", default=",".join(QUEUES), help=f"comma-separated: {kinds}")
    parser.add_argument("--metrics-port", type=int, default=9101, help="Prometheus endpoint of this worker")
    parser.add_argument("--concurrency", type=int, default=1, help="pool processes (one per GPU is the rule)")
    parser.add_argument("--name", help="Celery node name (default: <queues>-<pid>@<host>)")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        parser.error(f"--queues takes one or more of {', '.join(QUEUES)}, got {args.queues!r}")

    from app.contract.settings import get_settings

    try:
        settings = get_settings()
    except ValidationError as error:
        print(f"worker: invalid settings: {error}", file=sys.stderr)
        return 2
    multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc:  # may be a mount point (a tmpfs): empty it rather than replace it
        Path(multiproc).mkdir(parents=True, exist_ok=True)
        for stale in Path(multiproc).iterdir():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="harmonica-metrics-")
    os.environ["HARMONICA_WORKER_METRICS_PORT"] = str(args.metrics_port)
    # read by torch when a pool child imports it: each child's share of the cores (HARMONICA_TORCH_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(settings.threads_per_process(args.concurrency))
    name = args.name or f"{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker", "--pool", "prefork"]
    command += ["--queues", ",".join(queues), "--concurrency", str(args.concurrency), "--hostname", name]
    command += ["--loglevel", args.loglevel, "--without-gossip", "--without-mingle"]
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
