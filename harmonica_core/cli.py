"""`harmonica` command line: generate images with a cache method, train routers, and rebuild the built-in digits model.

Requests are checked before any model loads, by the service's rules and limits (the same HARMONICA_MAX_*
variables), so a request the API refuses is refused here too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from .cache.methods import METHODS, NEEDS_ROUTER, methods_using, parameters
from .catalog import DEFAULT_EXECUTION_MODE, EXECUTION_MODES
from .errors import RankFailed
from .validation import Limits, RouterInfo, default_class_labels, validate_generation, validate_training


class CliError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS, SCHEDULERS

    parser = argparse.ArgumentParser(prog="harmonica", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images, one PNG each plus summary.json")
    gen.add_argument(
        "--model", default="digits", help=f"'digits', a hub id or a diffusers folder; known: {', '.join(MODELS)}"
    )
    methods = "; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items())
    gen.add_argument("--method", choices=list(METHODS), default="none", help=f"cache method ({methods})")
    gen.add_argument(
        "--router",
        help="router file (.safetensors) for l2c / harmonica; for digits 'builtin' (the 2x router "
        "for --scheduler and --steps) or a built-in's id (README, 'Built-in routers')",
    )
    for param in parameters().values():  # each cache method's parameters, from the method registry
        gen.add_argument(f"--{param.name}", type=param.type, help=f"{param.help} (methods: {methods_using(param)})")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps")
    gen.add_argument("--scheduler", choices=list(SCHEDULERS), default="ddim")
    cond = gen.add_mutually_exclusive_group()
    cond.add_argument("--labels", type=_labels, help="class labels, e.g. 0,1,2 (DiT models)")
    cond.add_argument("--prompt", action="append", help="text prompt (PixArt models); repeat for several")
    gen.add_argument("--num-images", type=int, default=1, help="images per label or prompt")
    gen.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    gen.add_argument("--height", type=int, help="image height in pixels (PixArt)")
    gen.add_argument("--width", type=int, help="image width in pixels (PixArt)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    modes = "; ".join(f"{name}: {description}" for name, description in EXECUTION_MODES.items())
    gen.add_argument(
        "--mode", choices=list(EXECUTION_MODES), default=DEFAULT_EXECUTION_MODE, help=f"execution ({modes})"
    )
    gen.add_argument("--out", type=Path, required=True, help="output folder")

    from .train_config import EVAL_SAMPLES, settings

    tr = commands.add_parser("train-router", help="train a router (SDT + IEPO, LTC, or L2C) and write its file")
    tr.add_argument("--model", default="digits", help="'digits', a hub id or a diffusers folder")
    for setting in settings():  # TrainConfig's fields, as the HTTP training request has them
        flag = "--" + setting.name.replace("_", "-")
        tr.add_argument(
            flag, type=setting.type, default=setting.default, help=setting.help, choices=setting.choices or None
        )
    tr.add_argument("--captions", type=Path, help="PixArt: a text file with one caption per line")
    tr.add_argument(
        "--data", type=Path, help="L2C on non-digits models: safetensors with `samples` latents (+ `labels`)"
    )
    tr.add_argument("--checkpoint", type=Path, help="checkpoint file: written per trajectory, resumed from if present")
    tr.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help="samples for the quality numbers")
    tr.add_argument("--device", default="cpu", help="cpu or cuda (with --nproc, process k uses cuda:k)")
    tr.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        help="training processes under torchrun (one GPU each with cuda, gloo on the cpu); the batch is split",
    )
    tr.add_argument("--progress-file", type=Path, help=argparse.SUPPRESS)  # JSON lines from rank 0, for the worker
    tr.add_argument("--out", type=Path, required=True, help="router file to write (.safetensors)")

    mr = commands.add_parser(
        "measure-router", help="a router file's quality against uncached generation on a fixed evaluation set"
    )
    mr.add_argument("--router", type=Path, required=True, help="router file (.safetensors)")
    mr.add_argument("--model", default="digits", help="the model it was trained for")
    mr.add_argument("--samples", type=_positive, default=500, help="evaluation samples (fixed seed)")
    mr.add_argument("--device", default="cpu")
    mr.add_argument("--write", action="store_true", help="record the measurement in the file's metadata")

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    qb = bench.add_parser("quality", help="quality vs speedup of every method from the same noise (trains routers)")
    qb.add_argument("--model", default="digits")
    qb.add_argument("--steps", type=int, default=20)
    qb.add_argument("--scheduler", choices=list(SCHEDULERS), default="ddim")
    qb.add_argument("--samples", type=_positive, default=500, help="samples per method (fixed seeds)")
    qb.add_argument("--iterations", type=int, default=380, help="router updates per trained router")
    qb.add_argument(
        "--only",
        help="comma-separated method groups to run beside `none`: fewer-steps, fora, forecast, spread (with "
        "forecast), delta, iepo, ltc, l2c, target (IEPO routers aimed at target speedups), image (image-objective "
        "routers aimed at them)",
    )
    qb.add_argument("--out", type=Path, default=Path("bench/results"))

    digits = commands.add_parser("digits", help="rebuild the built-in digits model").add_subparsers(
        dest="digits_command", required=True
    )
    train = digits.add_parser("train", help="train the digits DiT (a GPU takes minutes, a CPU hours)")
    from .digits.model import WEIGHTS_DIR, DigitsTrainConfig

    defaults = DigitsTrainConfig()
    train.add_argument("--iterations", type=_positive, default=defaults.iterations)
    train.add_argument("--batch-size", type=_positive, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default="cpu")
    train.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    evaluate = digits.add_parser("evaluate", help="classifier accuracy and Frechet distance of uncached samples")
    evaluate.add_argument("--per-class", type=_positive, default=50, help="samples per digit")
    evaluate.add_argument("--steps", type=_positive, default=20)
    evaluate.add_argument("--scheduler", choices=list(SCHEDULERS), default="ddim")
    evaluate.add_argument("--guidance", type=float, default=1.5)
    evaluate.add_argument("--seed", type=int, default=0)
    clf = digits.add_parser("train-classifier", help="train the digit classifier used for quality metrics")
    clf.add_argument("--epochs", type=_positive, default=60)
    clf.add_argument("--seed", type=int, default=0)
    return parser


ROUTER_HELP = "--router PATH (train one with `harmonica train-router`), or for digits 'builtin' or a built-in's id"


def generation_request(args: argparse.Namespace) -> dict:
    """The arguments as the API's request body, so both are validated alike."""
    accel = {"method": args.method, "router_id": args.router, **{name: getattr(args, name) for name in parameters()}}
    return {
        "model": args.model, "class_labels": args.labels, "prompts": args.prompt, "num_images": args.num_images,
        "steps": args.steps, "scheduler": args.scheduler, "guidance": args.guidance, "seed": args.seed,
        "height": args.height, "width": args.width, "acceleration": accel,
    }  # fmt: skip


def run_generate(args: argparse.Namespace) -> dict:
    from .cache.methods import plan_from_request
    from .models import load_model
    from .router import load_router
    from .sampling import GenerationRequest, generate

    path = None
    if args.router is not None and args.method in NEEDS_ROUTER:
        builtin = args.router == "builtin" or args.router.startswith("builtin-")
        path = builtin_router(args.model, args.scheduler, args.steps, args.router) if builtin else Path(args.router)
    info = RouterInfo.read(path) if path is not None else None
    req = validate_generation(generation_request(args), Limits.from_env(), info, router_help=ROUTER_HELP)
    accel = req["acceleration"]
    model = load_model(args.model, device=args.device)
    if model.spec.class_conditional and req["class_labels"] is None:  # a local folder: its classes are known now
        req["class_labels"] = default_class_labels(model.num_classes)
    request = GenerationRequest.from_request(req)
    router = None
    if path is not None:
        router, _ = load_router(path, model.router_target(req["scheduler"], req["steps"]))
    plan = plan_from_request(accel, req["steps"], model.branch_layout, router)
    result = generate(model, request, plan, mode=args.mode)
    return write_images(result, args.out, req["num_images"], method=accel["method"], model=req["model"])


def builtin_router(model: str, scheduler: str, steps: int, name: str) -> Path:
    """The file of a built-in router: `name` is its id, or `builtin` for the default at this scheduler and steps."""
    from .catalog import builtin_routers, default_builtin_router

    routers = builtin_routers() if model == "digits" else {}
    router_id = default_builtin_router(scheduler, steps) if name == "builtin" else name
    if router_id not in routers:
        wanted = f"with {scheduler} at {steps} steps" if name == "builtin" else f"named {name}"
        raise CliError(f"no built-in router for {model} {wanted} (built in: {', '.join(routers) or 'none'})")
    return routers[router_id]


def training_request(args: argparse.Namespace) -> dict:
    """The arguments as the API's training request body, so both are validated alike."""
    from .train_config import settings

    names = ["model", *(setting.name for setting in settings()), "eval_samples"]
    return {name: getattr(args, name) for name in names}


def training_argv(model: str, config, eval_samples: int, out: Path, checkpoint: Path, device: str) -> list[str]:
    """`harmonica train-router` arguments for a checked `TrainConfig` (the service's), to run under torchrun."""
    from .train_config import settings

    argv = ["train-router", "--model", model, "--out", str(out), "--checkpoint", str(checkpoint), "--device", device]
    for setting in settings():
        if getattr(config, setting.name) is not None:  # an unset optional setting stays unset
            argv += ["--" + setting.name.replace("_", "-"), str(getattr(config, setting.name))]
    return [*argv, "--eval-samples", str(eval_samples)]


def run_train_router(args: argparse.Namespace, argv: list[str]) -> dict | None:
    """Train in this process, or (--nproc above 1, outside torchrun) start torchrun on this same command."""
    from .distributed import World, joined, launch
    from .models import load_model
    from .train_config import TrainConfig
    from .training import train_and_save

    req = validate_training(training_request(args), Limits.from_env(), data=args.data is not None)
    config = TrainConfig(**{name: req[name] for name in TrainConfig.__dataclass_fields__ if name in req})
    config.validate()
    World(size=args.nproc).check_batch(config.batch_size)  # the service's HARMONICA_MAX_TRAIN_GPUS is not the CLI's
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        launch(argv, args.nproc, args.device)
        return None
    with joined(args.device) as (world, device):
        model = load_model(args.model, device=device)
        data = load_train_data(args, model)
        progress = _progress(config, args.progress_file) if world.main else None
        with progress or nullcontext() as report:
            return train_and_save(model, config, args.out, data, args.eval_samples, report, args.checkpoint, world)


@contextmanager
def _progress(config, file: Path | None):
    """The training progress callback: a bar on stderr, and with `file` one JSON line per report there."""
    from tqdm import tqdm

    from .training import TrainProgress

    with tqdm(total=config.iterations, desc=f"router ({config.objective})", unit="update") as bar:

        def progress(p: TrainProgress) -> None:
            bar.update(p.iteration - bar.n)
            if p.phase == "lambdas":  # full sampling passes: the bar waits, and says why
                bar.set_postfix_str(f"estimating lambdas: pass {p.lambda_pass}/{p.lambda_passes}")
            else:
                bar.set_postfix(
                    loss=f"{p.loss:.3g}", cur=f"{p.cache_usage_rate:.1%}", speedup=f"{p.theoretical_speedup:.2f}x"
                )
            if file is not None:
                with file.open("a") as lines:
                    lines.write(json.dumps(p.as_dict()) + "\n")

        yield progress


def load_train_data(args: argparse.Namespace, model):
    from .training import DEFAULT_CAPTIONS, default_data

    data = default_data(model, args.objective)
    if args.captions is not None:
        if not args.captions.is_file():
            raise CliError(f"no caption file at {args.captions}")
        lines = tuple(line.strip() for line in args.captions.read_text().splitlines() if line.strip())
        data.captions = lines or DEFAULT_CAPTIONS
    if args.objective != "l2c" or data.samples is not None:
        return data
    if args.data is None or not args.data.is_file():
        raise CliError("--objective l2c trains from real data: give --data FILE.safetensors with `samples` latents")
    from safetensors.torch import load_file

    tensors = load_file(str(args.data))
    if "samples" not in tensors:
        raise CliError(f"{args.data} has no `samples` tensor")
    data.samples, data.labels = tensors["samples"], tensors.get("labels")
    return data


def run_measure_router(args: argparse.Namespace, command: str) -> dict:
    """Measure a router as training does (`training.router_quality`), at its own threshold, sampler, steps and
    guidance; with --write, the file's quality becomes this measurement (its logits stay as they are)."""
    from dataclasses import replace

    from .models import load_model
    from .router import load_router, read_router, save_router
    from .train_config import TrainConfig
    from .training import default_data, router_quality

    _, found = read_router(args.router)
    model = load_model(args.model, device=args.device)
    scheduler = found.training.get("scheduler", "ddim")
    router, metadata = load_router(args.router, model.router_target(scheduler, found.target.steps))
    config = TrainConfig(**{k: v for k, v in metadata.training.items() if k in TrainConfig.__dataclass_fields__})
    data = default_data(model, config.objective)
    _, quality = router_quality(model, router, metadata.method, metadata.threshold, config, args.samples, data)
    quality["command"] = command
    if args.write:
        save_router(args.router, router, replace(metadata, quality=quality))
    return quality


def describe(quality: dict) -> str:
    """A router's measured quality in one line."""
    accuracy = f", accuracy {quality['accuracy']:.1%}" if "accuracy" in quality else ""
    interval = " [{:.1f}, {:.1f}]".format(*quality["psnr_ci95"]) if quality.get("psnr_ci95") else ""
    return (
        f"cache usage {quality['cache_usage_rate']:.1%}, theoretical speedup {quality['theoretical_speedup']:.2f}x, "
        f"PSNR {quality['psnr']:.1f}{interval} dB vs uncached{accuracy}"
    )


def run_evaluate(args: argparse.Namespace) -> dict:
    from .digits.evaluate import score_digits
    from .models import load_model
    from .sampling import GenerationRequest, generate

    labels = [c for c in range(10) for _ in range(args.per_class)]
    request = GenerationRequest(
        class_labels=labels, steps=args.steps, scheduler=args.scheduler, guidance=args.guidance, seed=args.seed
    )
    score = score_digits(generate(load_model("digits"), request).images, labels)
    settings = {k: v for k, v in vars(args).items() if k not in {"command", "digits_command"}}
    return {"accuracy": score.accuracy, "frechet": score.frechet, "samples": score.samples} | settings


def only_groups(config, groups: str):
    """The benchmark config restricted to the named method groups (`none` always runs: it is the reference)."""
    from dataclasses import replace

    wanted = {group.strip() for group in groups.split(",") if group.strip()}
    known = {"fewer-steps", "fora", "forecast", "spread", "delta", "target", "image", *config.betas}
    if not wanted or wanted - known:
        raise CliError(f"--only takes some of {', '.join(sorted(known))}, got {groups!r}")
    return replace(
        config,
        fewer_steps=config.fewer_steps if "fewer-steps" in wanted else (),
        fora=config.fora if "fora" in wanted else (),
        forecast=config.forecast if "forecast" in wanted else (),
        spread=config.spread if "spread" in wanted else (),
        delta=config.delta if "delta" in wanted else (),
        targets=config.targets if "target" in wanted else (),
        image_routers=config.image_routers if "image" in wanted else (),
        betas={objective: betas for objective, betas in config.betas.items() if objective in wanted},
    )


def write_images(result, out: Path, rows: int, **extra: object) -> dict:
    """One PNG per image, a labelled grid.png and summary.json; returns the summary."""
    from .images import save_images

    names = save_images(result.images, result.labels, rows, out)
    summary = {**extra, **result.stats.as_dict(), "images": names, "captions": result.labels}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train-router":
            quality = run_train_router(args, sys.argv[1:] if argv is None else argv)
            if quality is not None:  # a single process, or rank 0 (the launcher and the other ranks say nothing)
                print(f"wrote {args.out}: {describe(quality)}")
        elif args.command == "measure-router":
            command = "harmonica " + " ".join(sys.argv[1:] if argv is None else argv)
            quality = run_measure_router(args, command)
            written = f"; recorded in {args.router}" if args.write else ""
            print(f"{args.router}: {describe(quality)} over {quality['samples']} samples{written}")
        elif args.command == "bench":
            from .quality_bench import QualityBenchConfig, format_table, format_verdict, run_quality_bench

            config = QualityBenchConfig(
                model=args.model, steps=args.steps, scheduler=args.scheduler, samples=args.samples,
                iterations=args.iterations,
            )  # fmt: skip
            if args.only is not None:
                config = only_groups(config, args.only)
            for _, _, train in config.routers().values():  # every router the benchmark trains, before the model loads
                validate_training(asdict(train) | {"model": config.model}, Limits.from_env())
            result = run_quality_bench(config, args.out)
            print(format_table(result["rows"]))
            print(format_verdict(result["verdict"], result["rows"]))
            print(f"command: {result['command']}\nwrote {args.out}/quality_{args.model}_T{args.steps}.{{json,png}}")
        elif args.command == "generate":
            summary = run_generate(args)
            print(
                f"wrote {len(summary['images'])} images to {args.out} "
                f"(cache usage {summary['cache_usage_rate']:.1%}, theoretical speedup "
                f"{summary['theoretical_speedup']:.2f}x, {summary['latency_s']:.2f} s); "
                f"labelled grid: {args.out / 'grid.png'}"
            )
        elif args.digits_command == "train":
            from tqdm import tqdm

            from .digits.model import DigitsTrainConfig, train_digits

            config = DigitsTrainConfig(
                iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, seed=args.seed
            )
            with tqdm(total=config.iterations, desc="digits DiT", unit="it") as bar:

                def progress(iteration: int, loss: float) -> None:
                    bar.update(1)
                    if loss == loss:  # not NaN: reported every 50 iterations
                        bar.set_postfix(loss=f"{loss:.4f}")

                command = "harmonica " + shlex.join(sys.argv[1:] if argv is None else argv)
                out = train_digits(config, args.out, args.device, progress, command)
            print(f"wrote the digits model to {out}")
        elif args.digits_command == "evaluate":
            print(json.dumps(run_evaluate(args), indent=2))
        else:
            from .digits.classifier import train_classifier

            report = train_classifier(args.epochs, args.seed)
            print(f"held-out accuracy {report['test_accuracy']:.2%} on {report['test_images']} real digits")
    except (CliError, ValueError, FileNotFoundError, RankFailed) as error:
        print(f"harmonica: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
