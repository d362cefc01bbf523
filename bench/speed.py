"""Realized vs theoretical speedup of FORA plans against no caching, in one process.

CPU mode (default): the built-in digits model, batch 16, T = 20.
GPU mode (--device cuda): a randomly initialised DiT-XL/2-sized transformer at 256 px (32x32 latents),
batch 8, T = 20, fp16; skipped cleanly when CUDA is absent.

    python bench/speed.py                      # CPU, writes bench/results/speed_cpu.{json,png}
    python bench/speed.py --device cuda        # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from harmonica_core.cache.methods import fora_plan, none_plan
from harmonica_core.cache.plan import CachePlan
from harmonica_core.models import Model, load_model
from harmonica_core.sampling import GenerationRequest, generate
from harmonica_core.timing import interleaved_latencies, realized_speedups

DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2)  # fmt: skip


def build_model(device: str) -> Model:
    if device == "cpu":
        return load_model("digits")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(**DIT_XL_2_256).to(device, torch.float16).eval().requires_grad_(False)
    return Model("random DiT-XL/2 256px", "dit", transformer, DDIMScheduler(), labels={})


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    return f"{names[0] if names else platform.machine()}, {torch.get_num_threads()} threads"


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: GPU mode skipped")
        return 0
    batch = args.batch or (16 if args.device == "cpu" else 8)
    model = build_model(args.device)
    n = len(model.branch_layout)
    plans: dict[str, CachePlan] = {"none": none_plan(args.steps, n)}
    plans.update({f"fora n={k}": fora_plan(args.steps, n, k) for k in args.intervals})
    request = GenerationRequest(
        class_labels=[i % min(model.num_classes, 10) for i in range(batch)], steps=args.steps, guidance=1.5
    )
    if args.profile:
        return profile_reuse(model, request)
    runs = {name: (request, plan) for name, plan in plans.items()}
    seconds, stats = interleaved_latencies(model, runs, args.repeats, tqdm(range(args.repeats), desc="repeats"))
    realized = realized_speedups(seconds, "none")
    rows = []
    for name in plans:
        theoretical = stats[name].theoretical_speedup
        rows.append({
            "method": name,
            "cache_usage_rate": stats[name].cache_usage_rate,
            "median_s": statistics.median(seconds[name]),
            "realized_speedup": realized[name],
            "theoretical_speedup": theoretical,
            "realized_over_theoretical": realized[name] / theoretical,
            "seconds": seconds[name],
        })  # fmt: skip
    command = "python " + " ".join(sys.argv)
    result = {
        "command": command,
        "args": vars(args) | {"batch": batch},
        "model": model.name,
        "device": device_name(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"speed_{'cpu' if args.device == 'cpu' else 'gpu'}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(rows, f"{model.name} on {result['device']}, batch {batch}, T={args.steps}", stem.with_suffix(".png"))

    print(f"{model.name} on {result['device']} (torch {torch.__version__}), batch {batch}, T={args.steps}, "
          f"median of {args.repeats}")  # fmt: skip
    print("| method | cache usage | median s | realized | theoretical | realized/theoretical |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['cache_usage_rate']:.1%} | {row['median_s']:.3f} | "
              f"{row['realized_speedup']:.2f}x | {row['theoretical_speedup']:.2f}x | "
              f"{row['realized_over_theoretical']:.2f} |")  # fmt: skip
    print(f"command: {command}\nwrote {stem}.json and {stem}.png")
    return 0


def profile_reuse(model: Model, request: GenerationRequest) -> int:
    """Where the time goes once branches are skipped: step 0 computes, every later step reuses all."""
    from torch.profiler import ProfilerActivity, profile

    n = len(model.branch_layout)
    plan = CachePlan.from_rows([[True] * n] + [[False] * n] * (request.steps - 1))
    generate(model, request, plan)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, request, plan)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [r["theoretical_speedup"] for r in rows], 0.4, label="theoretical (MACs)")
    ax.bar([i + 0.2 for i in x], [r["realized_speedup"] for r in rows], 0.4, label="realized (wall time)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("speedup vs no cache")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the DiT-XL/2-sized GPU mode")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, help="images per generation (default 16 on CPU, 8 on GPU)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--profile", action="store_true", help="profile an all-reuse generation instead")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
