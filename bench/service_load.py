"""Load test of a running service: open-model (Poisson) arrivals, latency taken from the job records.

An open model submits at a fixed rate whatever the service does, so an overloaded service shows up
as growing queue time instead of being hidden by clients that wait (coordinated omission). Each phase
runs one cache method; the job records give queue, inference and end-to-end seconds per job. Jobs not
final `--drain` seconds after a phase are counted as unfinished. Batching on and off at rising rates of
one-image jobs: `bench/batching.py`, which starts its own services.

    make run                                   # in another terminal: gateway + workers on :8000
    python bench/service_load.py --rate 2 --duration 60
    # writes bench/results/service_load.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

FINAL = {"succeeded", "failed", "canceled"}
METHODS = {
    "none": {"method": "none"},
    "harmonica": {"method": "harmonica", "router_id": "builtin-digits-iepo-ddim-t20"},
}


def call(url: str, body: dict[str, Any] | None = None, key: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def cpu_model() -> str:
    """The processor's name, for the device a benchmark ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(base: str, method: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    body = {"model": "digits", "class_labels": list(range(10)), "num_images": args.images, "steps": 20,
            "acceleration": METHODS[method]}  # fmt: skip
    submitted, rejected = [], 0
    start = time.monotonic()
    next_at = start
    with tqdm(desc=f"{method}: submitting", unit="job", total=round(args.rate * args.duration)) as bar:
        while next_at < start + args.duration:
            time.sleep(max(0.0, next_at - time.monotonic()))
            status, job = call(f"{base}/generate", dict(body, seed=rng.randrange(2**32)), args.key)
            if status == 202:
                submitted.append(job["id"])
            else:
                rejected += 1
            bar.update(1)
            next_at += rng.expovariate(args.rate)
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.drain
    with tqdm(desc=f"{method}: finishing", unit="job", total=len(submitted)) as bar:
        while len(records) < len(submitted) and time.monotonic() < deadline:
            for job_id in submitted:
                if job_id not in records:
                    job = call(f"{base}/jobs/{job_id}", key=args.key)[1]
                    if job["status"] in FINAL:
                        records[job_id] = job
                        bar.update(1)
            time.sleep(0.2)
    done = [j for j in records.values() if j["status"] == "succeeded"]
    span = max(j["finished_at"] for j in done) - min(j["created_at"] for j in done) if done else 0.0
    series = {
        "queue_s": [j["started_at"] - j["created_at"] for j in done],
        "inference_s": [j["finished_at"] - j["started_at"] for j in done],
        "e2e_s": [j["finished_at"] - j["created_at"] for j in done],
    }
    summary = {
        name: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95), "p99": percentile(v, 0.99),
               "mean": statistics.fmean(v)} if v else None
        for name, v in series.items()
    }  # fmt: skip
    return {
        "method": method, "submitted": len(submitted), "rejected": rejected, "succeeded": len(done),
        "unfinished_at_deadline": len(submitted) - len(records),
        "failed": sum(j["status"] == "failed" for j in records.values()),
        "throughput_jobs_per_s": len(done) / span if span else 0.0,
        "cache_usage_rate": statistics.fmean(j["result"]["cache_usage_rate"] for j in done) if done else None,
        "theoretical_speedup": statistics.fmean(j["result"]["theoretical_speedup"] for j in done) if done else None,
        "latency": summary, "e2e_s": series["e2e_s"],
    }  # fmt: skip


def plot(phases: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for phase in phases:
        values = sorted(phase["e2e_s"])
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=phase["method"])
    ax.set(xlabel="end-to-end latency (s)", ylabel="share of jobs", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default=os.environ.get("HARMONICA_API_KEY"), help="API key, if the service has keys")
    parser.add_argument("--rate", type=float, default=2.0, help="job arrivals per second (Poisson)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per method")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait for a phase's jobs after it")
    parser.add_argument("--images", type=int, default=1, help="images per digit (10 digits per job)")
    parser.add_argument("--methods", default="none,harmonica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    status, ready = call(f"{args.url}/readyz")
    if status != 200:
        raise SystemExit(f"the service at {args.url} is not ready ({status}): start it with `make run`")
    rng = random.Random(args.seed)
    phases = [run_phase(args.url, method, args, rng) for method in args.methods.split(",")]
    command = "python bench/service_load.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in {"key", "out"}
    )
    result = {"command": command, "host": cpu_model(), "cpus": os.cpu_count(),
              "workers": ready["workers"], "phases": phases}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_load.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"digits, 10x{args.images} images/job, T=20, {args.rate:g} jobs/s for {args.duration:g} s"
    plot(phases, title, args.out / "service_load.png")
    for phase in phases:
        e2e = phase["latency"]["e2e_s"] or {}
        print(f"{phase['method']:>10}: {phase['succeeded']}/{phase['submitted']} ok, {phase['rejected']} rejected, "
              f"{phase['throughput_jobs_per_s']:.2f} jobs/s, e2e p50 {e2e.get('p50', 0):.2f} s "
              f"p95 {e2e.get('p95', 0):.2f} s p99 {e2e.get('p99', 0):.2f} s")  # fmt: skip
    print(f"command: {command}\nwrote {args.out}/service_load.{{json,png}}")


if __name__ == "__main__":
    main()
