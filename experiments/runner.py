"""Runs a study's arms in order and saves each finished arm, so a stopped study resumes.

What each arm trains and samples is in `arms`, how it is scored in `scoring`, what it costs in
`cost`; this module decides which arms still need running and records their results.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collafuse.common.nets import pick_device
from collafuse.experiments.arms import Arm, ArmRunner, ClientShare, load_shares, plan
from collafuse.experiments.config import ExperimentConfig
from collafuse.experiments.metrics import FeatureExtractor, load_feature_net
from collafuse.experiments.scoring import Scorer, ScoreSettings

__all__ = ["Arm", "ClientShare", "Study", "load_shares", "plan"]

log = logging.getLogger("collafuse.experiments")

SCORES = 3
"""Which figures a saved arm holds; a saved arm made before the current figures is rescored.
1: quality, cost, disclosure, membership. 2: adds copying (own and other clients' images).
3: copying against random halves of the reference sets, repeated."""


class Study:
    """Runs the arms of one config into an output directory; finished arms are not redone."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        say: Callable[[str], None] = print,
        inception: FeatureExtractor | None = None,
    ) -> None:
        self.config = config
        self.out = out
        self.say = say
        (out / "arms").mkdir(parents=True, exist_ok=True)
        (out / "grids").mkdir(parents=True, exist_ok=True)
        ev = config.eval
        device = pick_device(config.device)
        scorer = Scorer(
            ScoreSettings(ev.bootstrap, ev.level, ev.kid_subset_size, ev.membership_timesteps),
            load_feature_net(),
            ArmRunner.diffusion_of(config),
            out,
            inception,
        )
        self.runner = ArmRunner(config, out, device, scorer, say)

    def arm_path(self, arm: Arm) -> Path:
        """Where a finished arm's result lives."""
        return self.out / "arms" / f"{arm.key}.json"

    def digest(self, arm: Arm) -> str:
        """What a saved result must have been made with to be kept: the config's shared part,
        the arm's key and its own network and seed. The lists of arms are not part of it, so
        adding a cut, a client size or a seed leaves finished arms alone."""
        return self.config.arm_digest(f"{arm.key}|seed={arm.seed}", arm.client)

    def done(self, arm: Arm) -> dict[str, Any] | None:
        """The saved result of an arm, if it was made by this same config and holds every
        figure asked for. One that lacks a figure is run again: its models resume from their
        checkpoints, finished, so only sampling and scoring are redone."""
        path = self.arm_path(arm)
        if not path.exists():
            return None
        result: dict[str, Any] = json.loads(path.read_text())
        if result.get("digest") != self.digest(arm) or result.get("scores", 1) < SCORES:
            return None
        steps = self.config.eval.few_client_steps
        few = result.get("few_step_samplers", {})
        wanted = arm.kind == "collafuse" and steps
        if wanted and (few.get("steps") != steps or "analytic_both" not in few):
            return None
        return result

    def run(self) -> list[dict[str, Any]]:
        """Run every arm not yet done; returns all results in plan order."""
        arms = plan(self.config)
        results = []
        for k, arm in enumerate(arms, 1):
            saved = self.done(arm)
            if saved is not None:
                self.say(f"[{k}/{len(arms)}] {arm.key}: done earlier, kept")
                results.append(saved)
                continue
            self.say(f"[{k}/{len(arms)}] {arm.key}: running")
            started = time.perf_counter()
            digest = self.digest(arm)
            result = self.runner.run(arm, digest)
            result.update(
                arm=arm.kind,
                partition=arm.partition,
                cut_ratio=arm.cut_ratio,
                client=arm.client,
                seed=arm.seed,
                repeat=arm.repeat,
                key=arm.key,
                name=arm.name,
                digest=digest,
                scores=SCORES,
                wall_s=round(time.perf_counter() - started, 2),
            )
            tmp = self.arm_path(arm).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(self.arm_path(arm))
            ci = result["fid_ci"]["pooled"]
            self.say(
                f"[{k}/{len(arms)}] {arm.key}: pooled FID {ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}] "
                f"in {result['wall_s']:.0f}s"
            )
            results.append(result)
        return results
