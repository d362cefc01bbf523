"""`harmonica bench quality`: every method from the same noise, quality against speedup (the Pareto picture).

Methods: uncached at T (the reference) and at fewer steps, FORA n = 2, 3, 4, and routers trained with
the L2C, LTC and IEPO objectives over a sweep of beta. Routers are trained into `<out>/routers/` and
reused when already there, so a rerun only re-measures.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .cache.methods import make_plan, none_plan
from .cache.plan import CachePlan
from .models import Model, load_model
from .quality import evaluation_request, plan_quality
from .router import load_router
from .sampling import GenerationRequest, generate
from .timing import Run, interleaved_latencies, realized_speedups
from .train_config import TrainConfig, plan_method
from .training import train_and_save

DEFAULT_BETAS = {
    "iepo": (3e-7, 1e-6, 3e-6, 1e-5),
    "ltc": (3e-3, 1e-2, 3e-2),
    "l2c": (1e-3, 3e-3, 1e-2),
}


@dataclass
class QualityBenchConfig:
    model: str = "digits"
    steps: int = 20
    scheduler: str = "ddim"
    guidance: float = 1.5
    samples: int = 500
    fewer_steps: tuple[int, ...] = (14, 10, 7)
    fora: tuple[int, ...] = (2, 3, 4)
    forecast: tuple[tuple[int, int], ...] = ((2, 1), (3, 1), (3, 2), (4, 1), (4, 2))  # FORA (interval, order)
    delta: tuple[tuple[int, float], ...] = ((2, 0.4), (3, 0.5), (4, 0.6))  # (interval, target usage)
    betas: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_BETAS))
    iterations: int = 380
    batch_size: int = 8
    lr: float = 0.1
    lambda_every: int = 95
    timing_batch: int = 16
    timing_repeats: int = 3
    seed: int = 1234

    def train_config(self, objective: str, beta: float) -> TrainConfig:
        """The training config of the sweep's router for `objective` at `beta`."""
        return TrainConfig(
            objective=objective, steps=self.steps, scheduler=self.scheduler, iterations=self.iterations,
            batch_size=self.batch_size, lr=self.lr, beta=beta, lambda_every=self.lambda_every, guidance=self.guidance,
        )  # fmt: skip


def _router_plans(model: Model, config: QualityBenchConfig, out: Path) -> dict[str, tuple[str, CachePlan]]:
    """Train (or reuse) each router of the sweep; returns name -> (group, plan)."""
    plans = {}
    target = model.router_target(config.scheduler, config.steps)
    for objective, betas in config.betas.items():
        for beta in betas:
            name = f"{objective} beta={beta:g}"
            path = out / "routers" / f"{objective}_beta{beta:g}_T{config.steps}.safetensors"
            if not path.is_file():
                train = config.train_config(objective, beta)
                with tqdm(total=train.iterations, desc=f"train {name}", unit="update", leave=False) as bar:
                    train_and_save(model, train, path, eval_samples=20, on_progress=lambda p: bar.update(1))
            router, _ = load_router(path, target)
            plan = make_plan(plan_method(objective), config.steps, model.branch_layout, router)
            plans[name] = (objective, plan)
    return plans


def run_quality_bench(config: QualityBenchConfig, out: Path) -> dict[str, Any]:
    model = load_model(config.model)
    n = len(model.branch_layout)
    request = evaluation_request(model, config.samples, config.steps, config.scheduler, config.guidance, config.seed)
    reference = generate(model, request)
    methods: dict[str, tuple[str, GenerationRequest, CachePlan]] = {
        "none": ("none", request, none_plan(config.steps, n))
    }
    for steps in config.fewer_steps:
        methods[f"fewer steps T={steps}"] = (
            "fewer steps",
            replace(request, steps=steps),
            none_plan(steps, n),
        )
    layout = model.branch_layout
    for interval in config.fora:
        methods[f"fora n={interval}"] = ("fora", request, make_plan("fora", config.steps, layout, interval=interval))
    for interval, order in config.forecast:
        plan = make_plan("fora", config.steps, layout, interval=interval, forecast=order)
        methods[f"fora n={interval} forecast {order}"] = ("fora+forecast", request, plan)
    for interval, usage in config.delta:
        plan = make_plan("delta", config.steps, layout, interval=interval, usage=usage)
        methods[f"delta n={interval} u={usage:g}"] = ("delta", request, plan)
    for name, (group, plan) in _router_plans(model, config, out).items():
        methods[name] = (group, request, plan)

    profile = model.mac_profile(*model.check_size(None, None))
    full_macs = profile.generation_macs(None, config.steps, config.guidance > 1)
    rows = []
    for name, (group, req, plan) in tqdm(methods.items(), desc="measure"):
        quality = plan_quality(model, plan, req, reference)
        if req.steps != config.steps:  # fewer steps: speedup against the T-step uncached generation
            quality["theoretical_speedup"] = full_macs / profile.generation_macs(None, req.steps, config.guidance > 1)
        rows.append({"method": name, "group": group} | quality)

    timing = {name: Run(_with_batch(req, config.timing_batch), plan) for name, (_, req, plan) in methods.items()}
    seconds, _ = interleaved_latencies(model, timing, config.timing_repeats)
    for row, realized in zip(rows, realized_speedups(seconds, "none").values(), strict=True):
        row["realized_speedup_cpu"] = realized
    result = {
        "command": "harmonica " + " ".join(sys.argv[1:]),
        "config": asdict(config),
        "reference": {"samples": config.samples, "seed": config.seed},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{config.model}_T{config.steps}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _plot(
        rows, stem.with_suffix(".png"), f"{config.model}, T={config.steps} {config.scheduler}, {config.samples} samples"
    )
    return result


def _with_batch(request: GenerationRequest, batch: int) -> GenerationRequest:
    labels = request.class_labels[:batch] if request.class_labels else None
    prompts = request.prompts[:batch] if request.prompts else None
    embeddings = request.prompt_embeddings.select(slice(0, batch)) if request.prompt_embeddings else None
    return replace(request, class_labels=labels, prompts=prompts, prompt_embeddings=embeddings)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table: PSNR with its bootstrap 95 % interval; Frechet to real digits (realism) and to the
    uncached samples (fidelity)."""
    lines = [
        "| method | cache usage | theoretical | realized (CPU) | MSE | PSNR dB [95 % CI] | accuracy | Frechet real "
        "| Frechet uncached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in rows:
        low, high = r.get("psnr_ci95") or (nan, nan)
        lines.append(
            f"| {r['method']} | {r['cache_usage_rate']:.1%} | {r['theoretical_speedup']:.2f}x | "
            f"{r['realized_speedup_cpu']:.2f}x | {r['mse']:.2e} | {r['psnr']:.1f} [{low:.1f}, {high:.1f}] | "
            f"{r.get('accuracy', nan):.1%} | {r.get('frechet', nan):.2f} | {r.get('frechet_fidelity') or nan:.2f} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"none": "k*", "fewer steps": "s-", "fora": "^-", "fora+forecast": "^--", "delta": "x-"}
    styles |= {"l2c": "v-", "ltc": "D-", "iepo": "o-"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for group, style in styles.items():
        points = sorted((r for r in rows if r["group"] == group), key=lambda r: r["theoretical_speedup"])
        if not points:
            continue
        x = [p["theoretical_speedup"] for p in points]
        label = "HarmoniCa (iepo)" if group == "iepo" else group
        psnrs = [min(p["psnr"], 60) for p in points]
        line = axes[0].plot(x, psnrs, style, label=label)[0]
        if all(p.get("psnr_ci95") for p in points):  # the bootstrap 95 % intervals as a band
            low, high = ([min(p["psnr_ci95"][i], 60) for p in points] for i in (0, 1))
            axes[0].fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        axes[1].plot(x, [p.get("frechet_fidelity") or float("nan") for p in points], style, label=label)
    axes[0].set_ylabel("PSNR vs uncached, dB, 95 % CI band (capped at 60)")
    axes[1].set_ylabel("Frechet distance to uncached samples (fidelity; lower is better)")
    for ax in axes:
        ax.set_xlabel("theoretical speedup (MACs)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
