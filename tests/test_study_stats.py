"""The study's statistics: FID/KID from features agree with torchmetrics, intervals behave."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from collafuse.experiments.stats import (
    Interval,
    auc,
    fid_from_features,
    fid_kid_ci,
    kid_from_features,
    mean_ci,
    membership_ci,
    tpr_at_fpr,
)


class _Identity(torch.nn.Module):
    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _sets(shift: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=gen, dtype=torch.float64)
    fake = torch.randn(100, 16, generator=gen, dtype=torch.float64) * 1.3 + shift
    return real, fake


def test_fid_matches_torchmetrics() -> None:
    real, fake = _sets()
    metric = FrechetInceptionDistance(feature=_Identity(16))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_kid_on_all_images_matches_torchmetrics_single_full_subset() -> None:
    real, fake = _sets()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Identity(16), subsets=1, subset_size=100)
    # With subset_size = min(n_real, n_fake) torchmetrics draws a permutation of the fake set and
    # the first 100 real images in random order: the same estimator on the same 100 real images.
    metric.update(real[:100], real=True)
    metric.update(fake, real=False)
    mean, _ = metric.compute()
    assert kid_from_features(real[:100], fake) == pytest.approx(float(mean), rel=1e-6)


def test_quality_interval_contains_the_truth_gap_and_orders_arms() -> None:
    real, close = _sets(shift=0.1)
    _, far = _sets(shift=1.5)
    a = fid_kid_ci(real, close, resamples=60, level=0.95, seed=1)
    b = fid_kid_ci(real, far, resamples=60, level=0.95, seed=1)
    for q in (a, b):
        assert q.fid.low <= q.fid.high and q.kid.low <= q.kid.high
        assert (q.n_real, q.n_fake) == (120, 100)
    # A set shifted by 1.5 standard deviations is worse, and the intervals say so.
    assert a.fid.separated_from(b.fid) and a.fid.value < b.fid.value
    assert a.kid.separated_from(b.kid)
    # Same data, same seed: the same interval.
    assert fid_kid_ci(real, close, 60, 0.95, 1) == a


def test_mean_interval_and_separation() -> None:
    hits = torch.tensor([1.0] * 30 + [0.0] * 70)
    r = mean_ci(hits, resamples=300, level=0.95, seed=0)
    assert r.value == pytest.approx(0.3)
    assert 0.18 < r.low < 0.3 < r.high < 0.42
    constant = mean_ci(torch.ones(50), 100, 0.95, 0)
    assert (constant.low, constant.high) == (1.0, 1.0)
    assert Interval(1, 0.5, 1.5).separated_from(Interval(3, 2, 4))
    assert not Interval(1, 0.5, 2.5).separated_from(Interval(3, 2, 4))
    assert Interval.from_list(Interval(1.23456, 1.0, 2.0).to_list()).value == pytest.approx(1.235)


def test_membership_figures() -> None:
    gen = torch.Generator().manual_seed(0)
    members = torch.randn(400, generator=gen) + 3.0
    others = torch.randn(300, generator=gen)
    assert auc(members, others) > 0.95
    assert auc(others, members) < 0.05
    same = torch.randn(300, generator=gen)
    assert auc(same, same) == pytest.approx(0.5)
    assert tpr_at_fpr(torch.tensor([5.0, 0.0]), torch.arange(100.0), 0.01) == 0.0
    assert tpr_at_fpr(torch.tensor([99.5, 0.0]), torch.arange(100.0), 0.01) == 0.5
    r = membership_ci(members, others, resamples=40, level=0.95, seed=0)
    assert r.auc.low > 0.9 and r.auc.high <= 1.0
    assert 0.0 <= r.tpr_at_1pct_fpr.low <= r.tpr_at_1pct_fpr.value <= r.tpr_at_1pct_fpr.high
    chance = membership_ci(same[:150], same[150:], 40, 0.95, 0)
    assert chance.auc.low < 0.5 < chance.auc.high


def test_copying_tells_copies_from_images_never_seen() -> None:
    from collafuse.common.diffusion import Diffusion
    from collafuse.experiments.metrics import load_feature_net
    from collafuse.experiments.scoring import Scorer, ScoreSettings

    gen = torch.Generator().manual_seed(0)
    # Three clients with images of their own brightness: (N, 1, 28, 28) in [-1, 1].
    trains = [(torch.rand((20, 1, 28, 28), generator=gen) + k) / 1.5 - 1 for k in range(3)]
    tests = [(torch.rand((20, 1, 28, 28), generator=gen) + k) / 1.5 - 1 for k in range(3)]
    scorer = Scorer(
        ScoreSettings(resamples=50, level=0.95, kid_subset_size=8, membership_timesteps=1),
        load_feature_net(),
        Diffusion(torch.linspace(1e-4, 0.02, 50).numpy()),
        Path("unused"),
    )
    # Each repetition keeps a random half of each reference set. A sample that is a training
    # image lies on it when it was kept (half the time) and is otherwise as near to the other
    # training as to the held-out images: about 0.75. A held-out image mirrors that: 0.25.
    copies = scorer.copying([t[:10] for t in trains], trains, tests, seed=1)
    assert copies["own"][0] > 0.65 and copies["samples"] == 30
    unseen = scorer.copying([t[:10] for t in tests], trains, tests, seed=1)
    assert unseen["own"][0] < 0.35
    # Fresh images of the same kind copy nothing: 0.5 lies inside both intervals.
    fresh = [(torch.rand((10, 1, 28, 28), generator=gen) + k) / 1.5 - 1 for k in range(3)]
    null = scorer.copying(fresh, trains, tests, seed=1)
    assert null["own"][1] < 0.5 < null["own"][2] and null["other"][1] < 0.5 < null["other"][2]
    for result in (copies, unseen):
        for which in ("own", "other"):
            value, low, high = result[which]
            assert 0.0 <= low <= value <= high <= 1.0
