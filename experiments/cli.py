"""`collafuse experiment --config experiments/NAME.toml --out DIR` and `collafuse bench`."""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

from collafuse.common.config import DEVICE_CHOICES, ConfigError, check_device, load_config
from collafuse.experiments.config import ExperimentConfig

log = logging.getLogger("collafuse.experiments")
# What the `experiments` extra installs. Every `collafuse` command builds this module's parser,
# so these are imported only inside the commands that need them: a client or server install
# has none of them.
EXTRA_MODULES = frozenset({"sklearn", "matplotlib", "torchmetrics"})


def require_extra(exc: ModuleNotFoundError) -> None:
    """Turn a missing `experiments` dependency into a ConfigError that says what to install."""
    missing = (exc.name or "").partition(".")[0]
    if missing in EXTRA_MODULES:
        raise ConfigError(
            f"this command needs the experiments extra ({missing} is not installed): "
            "pip install 'collafuse[experiments]', or '.[experiments]' from a checkout"
        ) from None


def _device(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (whether that GPU exists is checked at the start)."""
    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, not {text!r}") from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse experiment` and `collafuse bench`."""
    p = sub.add_parser(
        "experiment",
        help="run a study of cut ratios against baselines in one process and write a report",
    )
    p.add_argument("--config", type=Path, required=True, help="TOML with an ExperimentConfig")
    p.add_argument("--out", type=Path, required=True, help="output directory (resumable)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    p.add_argument("--machine", default="", help="how the report names the machine")
    p.add_argument(
        "--inception-weights",
        type=Path,
        help="also score pooled FID/KID with Inception-v3 features from this weights file "
        "(torch-fidelity's FID Inception; needs the torch-fidelity package)",
    )
    p.set_defaults(func=run_experiment)

    b = sub.add_parser(
        "bench",
        help="measure the server's hot paths against bare baselines, side by side in one run",
        description="Starts a server on loopback and measures P1..P6 (docs/benchmarks.md); "
        "prints a table and JSON. About 3 minutes on 2 CPU cores, 8 on a GPU.",
    )
    b.add_argument(
        "--out", type=Path, default=Path("bench-results.json"), help="where to write the JSON"
    )
    b.add_argument(
        "--quick", action="store_true", help="a tiny model, K up to 4, a few steps (a smoke run)"
    )
    b.add_argument(
        "--model",
        choices=["auto", "tiny", "server", "large"],
        default="auto",
        help="server UNet and image: tiny 16x16x1, server (the default UNet) 28x28x1, large "
        "(128,256,256,256) 32x32x3; auto: server on CPU, large on CUDA, tiny with --quick",
    )
    b.add_argument(
        "--device",
        type=_device,
        default="auto",
        metavar="DEVICE",
        help=f"{DEVICE_CHOICES} (default auto); cuda and cuda:N refuse to run without that GPU",
    )
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    b.add_argument("--reps", type=int, help="alternated repetitions per figure (default 3)")
    b.add_argument(
        "--no-compile",
        action="store_true",
        help="serve the network eager and skip P1's compiled baseline (on CUDA compiling takes "
        "a minute or more of the run; without it P1 compares eager bf16 with eager bf16)",
    )
    b.set_defaults(func=run_bench_command)

    from collafuse.experiments.multihost import add_multihost_command

    add_multihost_command(sub)


def describe_machine() -> str:
    """A short description of where the study runs."""
    import torch  # here, not at the top: every `collafuse` command builds this parser

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU ({torch.get_num_threads()} torch threads, {platform.processor() or 'unknown'})"


def run_experiment(args: argparse.Namespace) -> int:
    """Run every arm not yet done, then write the report."""
    try:
        from collafuse.experiments.report import write_report
        from collafuse.experiments.runner import Study
    except ModuleNotFoundError as exc:
        require_extra(exc)
        raise

    config = load_config(ExperimentConfig, args.config, args.set)
    inception = None
    if args.inception_weights is not None:
        from collafuse.common.metrics import inception_feature_extractor

        inception = inception_feature_extractor(args.inception_weights)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = Study(config, args.out, say=lambda s: print(s, flush=True), inception=inception)
    results = study.run()
    report = write_report(config, results, args.out, args.machine or describe_machine())
    print(f"report: {report} ({time.perf_counter() - started:.0f}s)")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """Run `collafuse bench`."""
    from dataclasses import replace

    from collafuse.common.nets import pick_device

    try:
        # P4's client daemon reads the digits data set, which scikit-learn provides: say so
        # now, not after the minutes of P1 to P3.
        import sklearn  # noqa: F401

        from collafuse.experiments.bench import default_settings, run_bench
    except ModuleNotFoundError as exc:
        require_extra(exc)
        raise

    settings = default_settings(pick_device(args.device), args.quick, args.model)
    if args.reps is not None:
        if args.reps < 1:
            raise ConfigError("--reps must be at least 1")
        settings = replace(settings, reps=args.reps)
    if args.no_compile:
        settings = replace(settings, compile=False)
    run_bench(
        settings,
        args.out,
        device=args.device,
        threads=args.threads,
        say=lambda s: print(s, flush=True),
        verbose=args.verbose,
    )
    return 0
