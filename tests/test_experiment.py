"""The smoke study end to end: every arm runs, the report is complete, a rerun resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from collafuse.common.config import load_config
from collafuse.experiments.config import ExperimentConfig
from collafuse.experiments.runner import SCORES, plan

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.toml"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def _run(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "collafuse",
            "experiment",
            "--config",
            str(SMOKE),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=1500,
    )


# About a minute on an idle 2-core machine; the limit leaves room for a busy one.
@pytest.mark.timeout(1800)
def test_smoke_study_report_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    first = _run(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    config = load_config(ExperimentConfig, SMOKE)
    arms = plan(config)
    assert "running" in first.stdout  # progress was shown

    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert [r["key"] for r in results] == [a.key for a in arms]
    kinds = {r["arm"] for r in results}
    assert kinds == {
        "local", "local-size", "local-flops", "centralised", "fedavg", "collafuse", "heuristic"
    }  # fmt: skip
    for r in results:
        assert set(r["fid"]) == {"client-0", "client-1", "client-2"}
        numbers = _numbers(
            {
                k: r[k]
                for k in ("fid", "kid", "fid_pooled", "kid_pooled", "fid_ci", "kid_ci", "cost")
            }
        )
        assert numbers and all(math.isfinite(x) for x in numbers), r["key"]
        assert r["fid_pooled"] > 0
        for which, (value, low, high) in r["fid_ci"].items():
            assert low <= high and value > 0, (r["key"], which)
        assert (out / r["grid"]).exists()
        copying = r["copying"]
        for which in ("own", "other"):
            value, low, high = copying[which]
            assert 0.0 <= low <= value <= high <= 1.0, (r["key"], which)
        assert copying["samples"] == 3 * 24 and copying["repetitions"] == 50
        assert r["scores"] == SCORES
    split = [r for r in results if r["arm"] == "collafuse" and r["seed"] == 0]
    for r in split:
        d = r["disclosure"]
        assert all(
            math.isfinite(d[k]) for k in ("snr", "kid_cut_vs_train", "attack_psnr", "attack_ssim")
        )
        assert 0.0 <= d["attack_reid"] <= 1.0 and 0.0 <= d["reid_raw_cut"] <= 1.0
        assert d["attack_reid_ci"][1] <= d["attack_reid"] <= d["attack_reid_ci"][2]
        assert d["attacker"] in {"server model", "raw-data model"}
        mia = d["membership"]
        assert 0.0 <= mia["auc"][1] <= mia["auc"][2] <= 1.0
        assert (mia["members"], mia["non_members"]) == (3 * 96, 3 * 48)
        few = r["few_step_samplers"]
        assert few["steps"] == 3
        kinds = ("ddim", "ddpm", "analytic", "ddpm_both", "analytic_both")
        assert all(few[k][1] <= few[k][2] and few[k][0] > 0 for k in kinds)
    assert not any("few_step_samplers" in r for r in results if r["arm"] != "collafuse")
    central = next(r for r in results if r["arm"] == "centralised")
    assert 0.0 <= central["disclosure"]["membership"]["auc"][0] <= 1.0
    # Equal client cost: local-only at the client's size spends exactly the client's training
    # FLOPs; at full size with the client's FLOPs, within one training step of them.
    for r in split:
        size = next(b for b in results if b["arm"] == "local-size" and b["client"] == r["client"])
        flops = next(b for b in results if b["arm"] == "local-flops" and b["client"] == r["client"])
        assert size["cost"]["client_train_gflops"] == r["cost"]["client_train_gflops"]
        assert flops["client_params"] > r["client_params"]
        assert flops["cost"]["client_train_steps"] < r["cost"]["client_train_steps"]
        assert flops["cost"]["client_train_gflops"] == pytest.approx(
            r["cost"]["client_train_gflops"], rel=0.5
        )
    # The key arm ran again with the second seed, under its own key.
    assert [r["key"] for r in results if r["seed"] == 1] == ["classes-collafuse-0.6-xs-s1"]
    # A later cut is noisier: lower SNR, and the client does more of the work.
    low, high = sorted(
        (r for r in split if r["client"] == "xs"), key=lambda r: r["cut_ratio"]
    )  # fmt: skip
    assert high["disclosure"]["snr"] < low["disclosure"]["snr"]
    assert (
        high["cost"]["client_synth_mflops_per_image"] > low["cost"]["client_synth_mflops_per_image"]
    )
    local = next(r for r in results if r["arm"] == "local")
    assert local["cost"]["client_train_gflops"] > high["cost"]["client_train_gflops"]

    report = (out / "report.md").read_text()
    for heading in (
        "## classes split", "### Fidelity", "### Frontier per client", "### Disclosure", "### Cost",
        "### What clients receive: copies of training images?",
        "### The client's sampler at few steps",
    ):  # fmt: skip
        assert heading in report
    assert "95% percentile bootstrap over 50 resamples" in report
    assert "24 generated images per client" in report
    names = ["fid_vs_cut", "disclosure_vs_cut", "client_compute_vs_cut", "tradeoff"]
    for name in names + [f"frontier_client{i}" for i in range(3)]:
        png = out / f"{name}_classes.png"
        assert Image.open(png).size[0] > 100
        assert f"({png.name})" in report
    assert (out / "results.csv").read_text().count("\n") == len(arms) + 1

    # A second run keeps every finished arm and rewrites the same report.
    second = _run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier, kept") == len(arms)
    again = json.loads((out / "results.json").read_text())["results"]
    assert [r["fid_pooled"] for r in again] == [r["fid_pooled"] for r in results]

    # An arm saved before a figure existed is rescored, not retrained: its models resume
    # finished from their checkpoints, so sampling gives the same images and the same FID.
    arm = next(r for r in results if r["arm"] == "collafuse")
    path = out / "arms" / f"{arm['key']}.json"
    old = json.loads(path.read_text())
    del old["copying"], old["scores"]
    path.write_text(json.dumps(old))
    third = _run(out)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("done earlier, kept") == len(arms) - 1
    rescored = json.loads(path.read_text())
    assert rescored["copying"] == arm["copying"] and rescored["fid_ci"] == arm["fid_ci"]


def test_inception_weights_must_exist(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "collafuse", "experiment", "--config", str(SMOKE),
            "--out", str(tmp_path / "x"), "--inception-weights", str(tmp_path / "missing.pth"),
        ],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "missing.pth does not exist" in proc.stderr
