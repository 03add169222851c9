"""Which arms a study runs, and which finished arms it keeps when the lists of arms change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collafuse.common.config import UNetConfig, load_config
from collafuse.experiments.config import (
    ExperimentConfig,
    StudyData,
    StudyEval,
    StudyModels,
    StudyTrain,
)
from collafuse.experiments.runner import Study, plan

TINY = UNetConfig(block_out_channels=(4, 8), attention_levels=(), norm_num_groups=4)
SMALL = UNetConfig(block_out_channels=(8, 8), attention_levels=(), norm_num_groups=4)


def _config(**changes: object) -> ExperimentConfig:
    base = ExperimentConfig(
        name="tiny",
        num_timesteps=21,
        device="cpu",
        arms=("local-size", "collafuse"),
        cut_ratios=(0.5,),
        data=StudyData(
            image_size=8, partitions=("classes",), train_per_client=8, test_per_client=8
        ),
        models=StudyModels(server=SMALL, full=SMALL, clients={"xs": TINY}),
        train=StudyTrain(epochs=2, client_epochs=2, batch_size=8),
        eval=StudyEval(samples_per_client=4, steps=4, bootstrap=10, membership_timesteps=1),
    )
    return base.model_copy(update=changes)


def test_plan_repeats_key_arms_with_every_seed() -> None:
    config = _config(
        seeds=(3, 4, 5),
        key_arms=("collafuse-0.5-xs",),
        cut_ratios=(0.3, 0.5),
        models=StudyModels(server=SMALL, full=SMALL, clients={"xs": TINY, "s": SMALL}),
    )
    keys = [a.key for a in plan(config)]
    assert keys == [
        "classes-local-size-xs",
        "classes-local-size-s",
        "classes-collafuse-0.3-xs",
        "classes-collafuse-0.3-s",
        "classes-collafuse-0.5-xs",
        "classes-collafuse-0.5-s",
        "classes-collafuse-0.5-xs-s4",
        "classes-collafuse-0.5-xs-s5",
    ]
    assert {a.seed for a in plan(config)} == {3, 4, 5}
    with pytest.raises(ValueError, match="name no planned arm"):
        plan(_config(key_arms=("collafuse-0.9-xs",)))


def test_digest_leaves_out_the_lists_of_arms() -> None:
    base = _config()
    more = _config(
        cut_ratios=(0.3, 0.5),
        seeds=(0, 1),
        arms=("local", "collafuse"),
        models=StudyModels(server=SMALL, full=SMALL, clients={"xs": TINY, "s": SMALL}),
    )
    assert base.digest() == more.digest()
    assert base.arm_digest("k", "xs") == more.arm_digest("k", "xs")
    # What changes results does change it: a budget, or the network of this arm's client.
    assert base.digest() != _config(train=StudyTrain(epochs=3, client_epochs=2)).digest()
    other = _config(models=StudyModels(server=SMALL, full=SMALL, clients={"xs": SMALL}))
    assert base.arm_digest("k", "xs") != other.arm_digest("k", "xs")


@pytest.mark.timeout(900)
def test_adding_a_cut_and_a_size_keeps_finished_arms(tmp_path: Path) -> None:
    said: list[str] = []
    first = Study(_config(), tmp_path, say=said.append).run()
    assert [r["key"] for r in first] == ["classes-local-size-xs", "classes-collafuse-0.5-xs"]
    split = first[1]
    assert 0.0 <= split["disclosure"]["membership"]["auc"][0] <= 1.0
    assert split["fid_ci"]["pooled"][1] <= split["fid_ci"]["pooled"][2]
    # The equal-cost baseline spends exactly the client's training FLOPs.
    assert first[0]["cost"]["client_train_gflops"] == split["cost"]["client_train_gflops"]

    said.clear()
    wider = _config(
        cut_ratios=(0.5, 0.3),
        models=StudyModels(server=SMALL, full=SMALL, clients={"xs": TINY, "s": SMALL}),
    )
    second = Study(wider, tmp_path, say=said.append).run()
    kept = {line.split()[1].rstrip(":") for line in said if "done earlier, kept" in line}
    assert kept == {"classes-local-size-xs", "classes-collafuse-0.5-xs"}
    by_key = {r["key"]: r for r in second}
    assert set(by_key) == {
        "classes-local-size-xs",
        "classes-local-size-s",
        "classes-collafuse-0.5-xs",
        "classes-collafuse-0.5-s",
        "classes-collafuse-0.3-xs",
        "classes-collafuse-0.3-s",
    }
    assert by_key["classes-collafuse-0.5-xs"]["fid_pooled"] == split["fid_pooled"]
    # The new size at the old cut met the server trained for the first run (same disclosure).
    assert by_key["classes-collafuse-0.5-s"]["disclosure"] == split["disclosure"]
    saved = json.loads((tmp_path / "arms" / "classes-collafuse-0.5-xs.json").read_text())
    assert saved["digest"] == split["digest"]

    # A changed network for one size reruns that size's arms only.
    said.clear()
    resized = _config(
        cut_ratios=(0.5, 0.3),
        models=StudyModels(server=SMALL, full=SMALL, clients={"xs": TINY, "s": TINY}),
    )
    Study(resized, tmp_path, say=said.append).run()
    ran = {line.split()[1].rstrip(":") for line in said if line.endswith("running")}
    assert ran == {"classes-local-size-s", "classes-collafuse-0.5-s", "classes-collafuse-0.3-s"}


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))
)
def test_committed_configs_load_and_plan(path: Path) -> None:
    config = load_config(ExperimentConfig, path)
    arms = plan(config)
    assert arms and len({a.key for a in arms}) == len(arms)


def test_the_study_and_the_bench_take_a_gpu_index() -> None:
    from collafuse.cli import build_parser

    base = _config().model_dump()
    assert ExperimentConfig.model_validate({**base, "device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ValueError, match="cuda:N"):
        ExperimentConfig.model_validate({**base, "device": "gpu1"})
    assert build_parser().parse_args(["bench", "--device", "cuda:2"]).device == "cuda:2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--device", "cuda:x"])
