"""Router training cost: seconds per router update and peak memory, SDT (iepo) against L2C, each with
our frozen transformer + no_grad teacher and with the released code's setup (weights take gradients,
teacher keeps its graph), so the saving is measured; and SDT on 2 processes (torchrun, the same global batch
and the same cores, split: gloo on the CPU, one GPU each with CUDA, measured where 2 GPUs are present).

CPU mode (default): the digits model, T = 20, batch 8.
GPU mode (--device cuda): a random DiT-XL/2-sized transformer at 256 px, T = 10, batch 8, fp16;
skipped cleanly without CUDA. Each variant runs in its own process so peak memory is its own.

    python bench/train_cost.py                 # writes bench/results/train_cost_cpu.json
    python bench/train_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # objective, frozen, processes
    "sdt-iepo": ("iepo", True, 1),
    "sdt-iepo released-style": ("iepo", False, 1),
    "l2c": ("l2c", True, 1),
    "l2c released-style": ("l2c", False, 1),
    "sdt-iepo, 2 processes": ("iepo", True, 2),
}


def measure(variant: str, device: str, steps: int, batch: int) -> dict | None:
    """Run one variant in this process (under torchrun, this rank): 4 trajectories' worth of updates, two lambda
    refreshes. Rank 0 returns the measurement, the other ranks None."""
    from harmonica_core.distributed import joined

    with joined(device) as (world, device):
        return _measure(variant, device, steps, batch, world)


def _measure(variant: str, device: str, steps: int, batch: int, world) -> dict | None:
    from harmonica_core.train_config import TrainConfig
    from harmonica_core.training import TrainData, default_data, train_router

    if device == "cpu":
        from harmonica_core.models import load_model

        model = load_model("digits")
        data = default_data(model, VARIANTS[variant][0])
    else:
        from speed import build_model

        model = build_model(device)
        generator = torch.Generator().manual_seed(0)
        data = TrainData(samples=torch.randn(64, 4, 32, 32, generator=generator), labels=torch.randint(1000, (64,)))
    objective, frozen, _ = VARIANTS[variant]
    updates = 4 * (steps - 1)
    config = TrainConfig(objective=objective, steps=steps, iterations=updates, batch_size=batch,
                         lambda_every=2 * (steps - 1), frozen=frozen)  # fmt: skip
    events: list[tuple[str, int, float]] = []  # (phase, lambda pass, time) of every progress report
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def stamp(progress) -> None:
        sync()
        events.append((progress.phase, progress.lambda_pass, time.perf_counter()))

    start = time.perf_counter()
    train_router(model, config, data, on_progress=stamp, world=world)
    if not world.main:
        return None
    updates, refreshes, before = [], [], start
    for phase, lambda_pass, at in events:
        if phase == "updates":
            updates.append(at - before)  # since the last report: one update (a refresh's passes come before it)
        elif lambda_pass == 1:
            refresh_start = before
        elif lambda_pass == steps:
            refreshes.append(at - refresh_start)  # the T sampling passes of one lambda estimation
        before = at
    median = statistics.median(updates[steps - 1 :])  # after one warm-up trajectory
    peak = (
        torch.cuda.max_memory_allocated()
        if device != "cpu"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "variant": variant,
        "update_s": median,
        "lambda_refresh_s": statistics.mean(refreshes[1:] or refreshes) if refreshes else None,  # 1st: warm-up
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device != "cpu" else "process max RSS",
        "processes": world.size,
    }


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: GPU mode skipped")
        return 0
    if args.single:
        row = measure(args.single, args.device, args.steps, args.batch)
        if row is not None:
            print(json.dumps(row))
        return 0
    rows, threads = [], torch.get_num_threads()
    for variant, (_, _, processes) in VARIANTS.items():
        if args.device != "cpu" and processes > torch.cuda.device_count():
            print(f"{variant}: not measured ({torch.cuda.device_count()} GPU)", file=sys.stderr)
            continue
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command = [sys.executable, *(launcher if processes > 1 else []), __file__, "--single", variant,
                   "--device", args.device, "--steps", str(args.steps), "--batch", str(args.batch)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // processes)))  # the same cores, split
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"measured {variant}", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device != "cpu" else "CPU (digits model)"
    result = {"command": "python " + " ".join(sys.argv), "device": device, "torch": torch.__version__,
              "threads": threads, "steps": args.steps, "batch": args.batch, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_cost_{'cpu' if args.device == 'cpu' else 'gpu'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{device}, {threads} torch threads in all, T={args.steps}, global batch {args.batch}")
    print("| variant | s / router update | lambda refresh s | peak memory GiB |\n|---|---|---|---|")
    for r in rows:
        refresh = f"{r['lambda_refresh_s']:.2f}" if r["lambda_refresh_s"] else "-"
        print(f"| {r['variant']} | {r['update_s']:.3f} | {refresh} | {r['peak_memory_gib']:.2f} |")
    print(f"command: {result['command']}\nwrote {path}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, help="sampling steps T (default 20 on CPU, 10 on GPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--single", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.device == "cpu" else 10)
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
