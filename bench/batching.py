"""Throughput of one-image generation jobs with cross-request batching off and on, at rising arrival rates.

For each configuration it starts its own service on loopback (embedded redis-server, gateway, one generation
worker; `chaos.Service`), then offers one-image `digits` jobs (the built-in router, T = 20) as Poisson
arrivals at each rate of `--rates` for `--duration` seconds, and waits for them at most `--drain` seconds
after the window. A rate is held when the queue does not grow: the median end-to-end latency of the last third
of its jobs is at most twice that of the first third plus 0.5 s (a growing queue makes later jobs wait ever
longer), and every job finished before the drain deadline. The ramp stops at the first rate not held. Batching off is
HARMONICA_MAX_BATCH_ROWS=0 (every job alone, as before batching); on is the default setting.

    .venv/bin/python bench/batching.py                 # writes bench/results/batching.{json,png}
    .venv/bin/python bench/batching.py --in-process    # the model's own ceiling: generate_batch, one thread
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).parent))
from service_load import FINAL, call, cpu_model, percentile

from harmonica_core.catalog import DEFAULT_EXECUTION_MODE as DEFAULT_MODE
from harmonica_core.catalog import EXECUTION_MODES as MODES

if TYPE_CHECKING:  # chaos needs the service's packages (redis), which --in-process does not
    from chaos import Service

CONFIGS = {"alone": {"HARMONICA_MAX_BATCH_ROWS": "0"}, "batched": {}}


def phase(service: Service, rate: float, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Offer `rate` jobs/s for the window; the jobs' records after at most `--drain` s more."""
    from chaos import ROUTER

    body = {"class_labels": [0], "steps": 20, "acceleration": {"method": "harmonica", "router_id": ROUTER}}
    submitted: list[str] = []
    start = time.monotonic()
    next_at = start
    while next_at < start + args.duration:
        time.sleep(max(0.0, next_at - time.monotonic()))
        status, job = call(f"{service.base}/generate", dict(body, class_labels=[rng.randrange(10)]))
        if status == 202:
            submitted.append(job["id"])
        next_at += rng.expovariate(rate)
    window_end = time.time()
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.drain
    while len(records) < len(submitted) and time.monotonic() < deadline:
        for job_id in submitted:
            if job_id not in records:
                job = call(f"{service.base}/jobs/{job_id}")[1]
                if job["status"] in FINAL:
                    records[job_id] = job
        time.sleep(0.25)
    done = sorted((j for j in records.values() if j["status"] == "succeeded"), key=lambda j: j["created_at"])
    span = max(j["finished_at"] for j in done) - done[0]["created_at"] if done else 0.0  # first arrival to last end
    in_window = sum(j["finished_at"] <= window_end for j in done)
    e2e = [j["finished_at"] - j["created_at"] for j in done]
    third = max(1, len(e2e) // 3)
    growing = statistics.median(e2e[-third:]) > 2 * statistics.median(e2e[:third]) + 0.5 if e2e else True
    batches = [j["result"]["batch"]["jobs"] for j in done]
    return {
        "rate": rate,
        "offered": len(submitted),
        "finished_in_window": in_window,
        "succeeded": len(done),
        "unfinished_at_deadline": len(submitted) - len(records),
        "held": not growing and len(done) == len(submitted),
        "throughput_jobs_per_s": len(done) / span if done else 0.0,
        "e2e_p50_s": percentile(e2e, 0.5) if e2e else None,
        "e2e_p95_s": percentile(e2e, 0.95) if e2e else None,
        "mean_jobs_per_batch": statistics.fmean(batches) if batches else None,
    }


def ramp(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from chaos import Service

    with tempfile.TemporaryDirectory(prefix=f"harmonica-batching-{name}-") as tmp:
        service = Service(Path(tmp), workers=1)
        service.env.update(CONFIGS[name])
        try:
            service.start()
            call(f"{service.base}/generate", {"class_labels": [0], "steps": 2})  # the first job pays for nothing
            rng, phases = random.Random(args.seed), []
            for rate in args.rates:
                phases.append(phase(service, rate, args, rng) | {"config": name})
                p = phases[-1]
                print(
                    f"{name:>8} {rate:5.2f} jobs/s: {p['finished_in_window']}/{p['offered']} in the window, "
                    f"e2e p50 {p['e2e_p50_s'] or 0:.2f} s p95 {p['e2e_p95_s'] or 0:.2f} s, "
                    f"{p['mean_jobs_per_batch'] or 0:.1f} jobs/batch, {'held' if p['held'] else 'NOT held'}",
                    flush=True,
                )
                if not p["held"]:
                    break
            return phases
        finally:
            service.stop()


def in_process(args: argparse.Namespace, sizes: list[int], repeats: int = 3) -> int:
    """One-image jobs per second that `generate_batch` makes at each batch size (on CPU with one torch thread, as
    the benchmark's worker has): the most batching can gain on the device, before any service overhead."""
    import torch
    from speed import build_model, device_name, make_request, router_plan

    from harmonica_core.execution import warm_up
    from harmonica_core.sampling import generate_batch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: GPU mode skipped")
        return 0
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    model = build_model(args.model, args.device)
    plan_name, plan = router_plan(model, 20)
    warm_up(model, args.mode, make_request(model, 1, 20))
    device = device_name(args.device)
    print(f"{model.name}, {plan_name}, T=20, {args.mode} mode, {device}, median of {repeats}")
    rows = []
    for size in sizes:
        requests = [replace(make_request(model, 1, 20), seed=i) for i in range(size)]
        generate_batch(model, requests, plan, mode=args.mode)  # warm-up
        runs = [generate_batch(model, requests, plan, mode=args.mode)[0].stats.total_seconds for _ in range(repeats)]
        seconds = statistics.median(runs)
        rows.append({"jobs": size, "seconds": seconds, "jobs_per_s": size / seconds})
        print(f"batch of {size:2d} one-image jobs: {seconds:.3f} s, {size / seconds:.2f} jobs/s")
    command = "python " + " ".join(sys.argv)
    result = {"command": command, "model": model.name, "plan": plan_name, "mode": args.mode, "device": device}
    result |= {"torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"batching_in_process_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"command: {command}\nwrote {path}")
    return 0


def plot(phases: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in CONFIGS:
        rows = [p for p in phases if p["config"] == name]
        axes[0].plot([p["rate"] for p in rows], [p["throughput_jobs_per_s"] for p in rows], "o-", label=name)
        axes[1].plot([p["rate"] for p in rows], [p["e2e_p95_s"] or float("nan") for p in rows], "o-", label=name)
    top = max(p["rate"] for p in phases)
    axes[0].plot([0, top], [0, top], "k:", lw=0.8, label="offered")
    axes[0].set(xlabel="offered jobs/s", ylabel="jobs finished / s", title="throughput")
    axes[1].set(xlabel="offered jobs/s", ylabel="e2e p95 (s)", yscale="log", title="latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per rate")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for a rate's jobs after it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--in-process", action="store_true", help="time generate_batch at batch sizes 1-16 instead")
    parser.add_argument("--device", default="cpu", help="--in-process: cpu, or cuda for the random XL models")
    parser.add_argument("--model", choices=["digits", "dit-xl", "pixart-xl"], default="digits", help="--in-process")
    parser.add_argument("--mode", choices=list(MODES), default=DEFAULT_MODE, help="--in-process: execution mode")
    args = parser.parse_args()
    if args.in_process:
        return in_process(args, [1, 2, 4, 8, 16])
    phases = [p for name in CONFIGS for p in ramp(name, args)]
    held = {
        name: max((p["rate"] for p in phases if p["config"] == name and p["held"]), default=0.0) for name in CONFIGS
    }
    command = "python " + " ".join(sys.argv)
    result = {"command": command, "cpu": cpu_model(), "held_jobs_per_s": held, "phases": phases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(phases, args.out / "batching.png")
    print(
        "| config | offered jobs/s | finished in window | throughput jobs/s | e2e p50 s | e2e p95 s | jobs/batch "
        "| held |\n|---|---|---|---|---|---|---|---|"
    )
    for p in phases:
        print(
            f"| {p['config']} | {p['rate']:g} | {p['finished_in_window']}/{p['offered']} | "
            f"{p['throughput_jobs_per_s']:.2f} | {p['e2e_p50_s'] or 0:.2f} | {p['e2e_p95_s'] or 0:.2f} | "
            f"{p['mean_jobs_per_batch'] or 0:.1f} | {'yes' if p['held'] else 'no'} |"
        )
    print(f"highest rate held: {held}\ncommand: {command}\nwrote {args.out}/batching.{{json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
