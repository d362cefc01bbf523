"""Realized vs theoretical speedup of cache plans, per execution mode and batch size, in one process.

Every (mode, batch, plan) is timed in interleaved rounds (`--repeats`, after one warm-up each), and realized
speedup is against the same mode and batch without caching: the median over rounds of the two times' ratio in
one round (`timing.realized_speedups`). Plans: no cache, FORA n = 2/3/4, and a
router's plan (the built-in digits router; on the random models a seeded plan reusing about half the branches).
It also prints the uncached step time beside the arithmetic bound: the step's MACs over the device's
measured matrix-product peak.

CPU (default): the built-in digits model, batches 1, 4, 16, T = 20.
GPU (--device cuda): a randomly initialised DiT-XL/2 at 256 px (--model dit-xl) or PixArt-XL/2 at 512 px
(--model pixart-xl), fp16, batches 1 and 8; exits cleanly when CUDA is absent.
Modes: all but `auto` (which picks one of them), and on CPU all but `graphs` (CUDA only).

    python bench/speed.py                                   # CPU: bench/results/speed_cpu_digits.{json,png}
    python bench/speed.py --device cuda --model dit-xl      # GPU
    python bench/speed.py --profile --mode compiled --batches 16   # where a generation's time goes
    bash bench/gpu.sh                                       # every GPU check in one run (tests, both models)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from service_load import cpu_model  # bench/ is this script's folder, so first on sys.path
from tqdm import tqdm

from harmonica_core.cache.methods import fora_plan, make_plan, none_plan
from harmonica_core.cache.plan import CachePlan
from harmonica_core.catalog import builtin_routers
from harmonica_core.execution import MODES, warm_up
from harmonica_core.models import Model, load_model
from harmonica_core.router import load_router
from harmonica_core.sampling import GenerationRequest, PromptEmbeddings, generate
from harmonica_core.timing import Run, interleaved_latencies, realized_speedups

DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2)  # fmt: skip
PIXART_XL_2_512 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=64,
    patch_size=2,
    caption_channels=4096,
    cross_attention_dim=1152,
    norm_type="ada_norm_single",
    use_additional_conditions=False,
)
TEXT_TOKENS = 120  # PixArt-α's T5 sequence length


def build_model(name: str, device: str) -> Model:
    """The digits model, or a random XL transformer without a VAE (the loop is what is timed)."""
    if name == "digits":
        return load_model("digits", device=device)
    torch.manual_seed(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if name == "dit-xl":
        transformer = DiTTransformer2DModel(**DIT_XL_2_256)
        model = Model("random DiT-XL/2 256px", "dit", transformer, DDIMScheduler())
    else:  # the PixArt pipeline imports transformers' T5: only where asked for
        from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

        transformer = PixArtTransformer2DModel(**PIXART_XL_2_512)
        pipe = PixArtAlphaPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=DDIMScheduler()
        )
        model = Model("random PixArt-XL/2 512px", "pixart", transformer, DDIMScheduler(), pipeline=pipe)
    transformer.to(device, dtype).eval().requires_grad_(False)
    return model


def make_request(model: Model, batch: int, steps: int) -> GenerationRequest:
    if model.spec.class_conditional:
        return GenerationRequest(class_labels=[i % min(model.num_classes, 10) for i in range(batch)], steps=steps)
    generator = torch.Generator().manual_seed(0)
    channels = model.transformer.config.caption_channels
    embeds = torch.randn(batch, TEXT_TOKENS, channels, generator=generator).to(model.dtype)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    embeddings = PromptEmbeddings(embeds, mask, torch.zeros_like(embeds), mask)
    return GenerationRequest(prompt_embeddings=embeddings, steps=steps, guidance=4.5)


def router_plan(model: Model, steps: int) -> tuple[str, CachePlan]:
    """The built-in IEPO router's plan on digits (the README's speed tables); elsewhere a seeded plan reusing about
    half the branches."""
    n = len(model.branch_layout)
    path = builtin_routers().get(f"builtin-digits-iepo-ddim-t{steps}")
    if model.name == "digits" and path is not None:
        router, _ = load_router(path, model.router_target("ddim", steps))
        return "harmonica (built-in router)", make_plan("harmonica", steps, model.branch_layout, router)
    rows = (torch.rand(steps, n, generator=torch.Generator().manual_seed(0)) < 0.5).tolist()
    return "router-like (50%)", CachePlan.from_rows([[True] * n, *rows[1:]])


def peak_macs_per_second(device: str, dtype: torch.dtype) -> float:
    """The device's matrix-product rate, measured: the median of several square products."""
    size = 4096 if device.startswith("cuda") else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(7):
        sync()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        times.append((time.perf_counter() - start) / 5)
    return size**3 / statistics.median(times[2:])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: GPU mode skipped")
        return 0
    cuda = args.device.startswith("cuda")
    name = args.model or ("dit-xl" if cuda else "digits")
    batches = args.batches or ([1, 8] if cuda else [1, 4, 16])
    args.modes = args.modes or [mode for mode in MODES if mode != "auto" and (cuda or mode != "graphs")]
    model = build_model(name, args.device)
    n = len(model.branch_layout)
    plans = {"none": none_plan(args.steps, n)} | {f"fora n={k}": fora_plan(args.steps, n, k) for k in args.intervals}
    router_name, plans[router_name] = router_plan(model, args.steps)

    compile_seconds = {mode: warm_up(model, mode, make_request(model, 1, args.steps)) for mode in args.modes}
    if args.profile:
        return profile_reuse(model, [make_request(model, batch, args.steps) for batch in batches], args.modes[-1])
    keys = [(mode, batch, plan_name) for batch in batches for mode in args.modes for plan_name in plans]
    requests = {batch: make_request(model, batch, args.steps) for batch in batches}
    runs = {f"{mode}|{batch}|{p}": Run(requests[batch], plans[p], mode) for mode, batch, p in keys}
    seconds, stats = interleaved_latencies(model, runs, args.repeats, tqdm(range(args.repeats), desc="rounds"))
    median = {(mode, batch, p): statistics.median(seconds[f"{mode}|{batch}|{p}"]) for mode, batch, p in keys}
    realized = {}
    for mode, batch in {(mode, batch) for mode, batch, _ in keys}:
        runs = {p: seconds[f"{mode}|{batch}|{p}"] for p in plans}
        realized |= {(mode, batch, p): value for p, value in realized_speedups(runs, "none").items()}
    peak = peak_macs_per_second(args.device, model.dtype)
    request = make_request(model, 1, args.steps)
    cond_rows = 2 if request.guidance > 1 else 1
    profile = model.mac_profile(*model.check_size(None, None), TEXT_TOKENS if not model.spec.class_conditional else 0)

    rows = []
    for mode, batch, plan_name in keys:
        name_ = f"{mode}|{batch}|{plan_name}"
        st = stats[name_]
        theoretical = st.theoretical_speedup
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "method": plan_name,
                "cache_usage_rate": st.cache_usage_rate,
                "median_s": median[mode, batch, plan_name],
                "realized_speedup": realized[mode, batch, plan_name],
                "theoretical_speedup": theoretical,
                "realized_over_theoretical": realized[mode, batch, plan_name] / theoretical,
                "seconds": seconds[name_],
            }
        )
    bounds = []
    for batch in batches:
        step_macs = profile.transformer_macs * batch * cond_rows
        for mode in args.modes:
            bounds.append(
                {
                    "mode": mode,
                    "batch": batch,
                    "uncached_step_s": median[mode, batch, "none"] / args.steps,
                    "arithmetic_bound_s": step_macs / peak,
                }
            )
    command = "python " + " ".join(sys.argv)
    device = device_name(args.device)
    result = {
        "command": command,
        "args": vars(args) | {"batches": batches, "model": name},
        "model": model.name,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_macs_per_s": peak,
        "compile_seconds": compile_seconds,
        "step_bounds": bounds,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"speed_{'gpu' if cuda else 'cpu'}_{name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(rows, args.modes, batches, f"{model.name} on {device}, T={args.steps}", stem.with_suffix(".png"))

    print(f"{model.name} on {device} (torch {torch.__version__}), T={args.steps}, median of {args.repeats} rounds")
    print("| mode | batch | method | cache usage | median s | realized | theoretical | realized/theoretical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["realized_over_theoretical"]
        print(
            f"| {r['mode']} | {r['batch']} | {r['method']} | {r['cache_usage_rate']:.1%} | {r['median_s']:.3f} | "
            f"{r['realized_speedup']:.2f}x | {r['theoretical_speedup']:.2f}x | {ratio:.2f} |"
        )
    print(f"\nmatrix-product peak measured: {peak / 1e9:.1f} GMAC/s ({model.dtype})")
    print("| mode | batch | uncached step s | arithmetic bound s | ratio |\n|---|---|---|---|---|")
    for b in bounds:
        ratio = b["uncached_step_s"] / b["arithmetic_bound_s"]
        print(
            f"| {b['mode']} | {b['batch']} | {b['uncached_step_s']:.4f} | {b['arithmetic_bound_s']:.4f} | {ratio:.1f} |"
        )
    print("warm-up (compile) seconds: " + ", ".join(f"{m} {s:.1f}" for m, s in compile_seconds.items()))
    print(f"command: {command}\nwrote {stem}.json and {stem}.png")
    return 0


def profile_reuse(model: Model, requests: list[GenerationRequest], mode: str) -> int:
    """Where a generation's time goes, per batch: the fixed cost of a generation, an uncached step and a step
    that reuses every branch, solved from synced wall times of three plans (uncached at T and at T/2 steps, and
    all-reuse after a computing first step; median of 5 each); then the profiler's top operators (with CUDA,
    their device time) over one all-reuse generation."""
    from torch.profiler import ProfilerActivity, profile

    n, cuda = len(model.branch_layout), model.device.type == "cuda"
    for request in requests:
        steps, half = request.steps, request.steps // 2
        plans = {
            "none": (steps, none_plan(steps, n)),
            "none-half": (half, none_plan(half, n)),
            "reuse": (steps, CachePlan.from_rows([[True] * n] + [[False] * n] * (steps - 1))),
        }
        seconds = {}
        for name, (t, plan) in plans.items():
            run = replace(request, steps=t)
            generate(model, run, plan, mode=mode)  # compiles and captures outside the timing
            times = [generate(model, run, plan, mode=mode).stats.total_seconds for _ in range(5)]
            seconds[name] = statistics.median(times)
        computing = (seconds["none"] - seconds["none-half"]) / (steps - half)
        fixed = seconds["none"] - steps * computing
        reusing = (seconds["reuse"] - fixed - computing) / (steps - 1)
        images = len(request.class_labels or []) or len(request.prompt_embeddings.embeds)
        print(
            f"{mode} mode, batch {images}, T = {steps}: per generation {fixed * 1000:.1f} ms fixed, "
            f"{computing * 1000:.2f} ms per uncached step, {reusing * 1000:.2f} ms per all-reuse step "
            f"({reusing / computing:.1%} of an uncached one)"
        )
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            generate(model, request, plans["reuse"][1], mode=mode)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))
    return 0


def plot(rows: list[dict], modes: list[str], batches: list[int], title: str, path: Path) -> None:
    """Realized over theoretical speedup per plan, one panel per batch size, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), sharey=True, squeeze=False)
    width = 0.8 / len(modes)
    for ax, batch in zip(axes[0], batches, strict=True):
        for j, mode in enumerate(modes):
            values = {
                r["method"]: r["realized_over_theoretical"] for r in rows if r["batch"] == batch and r["mode"] == mode
            }
            ax.bar(
                [i + (j - (len(modes) - 1) / 2) * width for i in range(len(methods))],
                [values[m] for m in methods],
                width,
                label=mode,
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=9)
    axes[0][0].set_ylabel("realized / theoretical speedup")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the random XL models")
    parser.add_argument(
        "--model", choices=["digits", "dit-xl", "pixart-xl"], help="default: digits on CPU, dit-xl on CUDA"
    )
    parser.add_argument(
        "--mode", dest="modes", nargs="+", choices=list(MODES), help="default: all but auto (on CPU also but graphs)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--batches", type=int, nargs="+", help="images per generation (default 1 4 16 on CPU, 1 8 on GPU)"
    )
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--profile", action="store_true", help="instead: where a generation's time goes, last --mode")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
