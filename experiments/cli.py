"""`collafuse experiment --config experiments/NAME.toml --out DIR`."""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch

from collafuse.common.config import load_config
from collafuse.experiments.config import ExperimentConfig

log = logging.getLogger("collafuse.experiments")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `collafuse experiment`."""
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


def describe_machine() -> str:
    """A short description of where the study runs."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU ({torch.get_num_threads()} torch threads, {platform.processor() or 'unknown'})"


def run_experiment(args: argparse.Namespace) -> int:
    """Run every arm not yet done, then write the report."""
    from collafuse.experiments.report import write_report
    from collafuse.experiments.runner import Study

    config = load_config(ExperimentConfig, args.config, args.set)
    inception = None
    if args.inception_weights is not None:
        from collafuse.common.metrics import inception_feature_extractor

        inception = inception_feature_extractor(args.inception_weights)
    if config.threads:
        torch.set_num_threads(config.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = Study(config, args.out, say=lambda s: print(s, flush=True), inception=inception)
    results = study.run()
    report = write_report(config, results, args.out, args.machine or describe_machine())
    print(f"report: {report} ({time.perf_counter() - started:.0f}s)")
    return 0
