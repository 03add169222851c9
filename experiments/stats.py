"""Bootstrap confidence intervals for the study's figures: FID, KID, rates, means and attack AUCs.

Every interval is a percentile bootstrap: resample the images (generated and held-out sets
separately, or members and non-members separately) with replacement, recompute the figure, and
take the central `level` share of the resampled values. An interval says how much the figure
would move with other samples of the same size from the same models; it does not cover
training-seed variance, which the study measures with repeated seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Interval:
    """A figure with its bootstrap interval."""

    value: float
    low: float
    high: float

    def to_list(self, digits: int = 4) -> list[float]:
        """[value, low, high], rounded for JSON."""
        return [_round(self.value, digits), _round(self.low, digits), _round(self.high, digits)]

    @classmethod
    def from_list(cls, values: list[float]) -> Interval:
        """Inverse of to_list."""
        return cls(float(values[0]), float(values[1]), float(values[2]))

    def separated_from(self, other: Interval) -> bool:
        """True when the two intervals do not overlap: only then does the study call a
        difference real."""
        return self.high < other.low or other.high < self.low


def _round(x: float, digits: int) -> float:
    if not math.isfinite(x):
        return x
    if x == 0:
        return 0.0
    # Significant digits, not decimals: KIDs are ~1e-3 and FIDs ~1e2.
    return round(x, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


def _percentiles(values: Tensor, level: float) -> tuple[float, float]:
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype)
    lo, hi = torch.quantile(values, q).tolist()
    return float(lo), float(hi)


def fid_from_features(f_real: Tensor, f_fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F), float64.

    The formula torchmetrics uses: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 sum sqrt(eig(S1 S2)).
    """
    return float(_fid_batched(f_real.unsqueeze(0), f_fake.unsqueeze(0))[0])


def _fid_batched(f_real: Tensor, f_fake: Tensor) -> Tensor:
    # (B, N, F), (B, M, F) -> (B,)
    mu1, mu2 = f_real.mean(1), f_fake.mean(1)
    d1, d2 = f_real - mu1[:, None], f_fake - mu2[:, None]
    s1 = d1.transpose(1, 2) @ d1 / (f_real.shape[1] - 1)  # (B, F, F)
    s2 = d2.transpose(1, 2) @ d2 / (f_fake.shape[1] - 1)
    a = (mu1 - mu2).square().sum(-1)
    b = s1.diagonal(dim1=1, dim2=2).sum(-1) + s2.diagonal(dim1=1, dim2=2).sum(-1)
    c = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum(-1)
    return a + b - 2 * c


def kid_from_features(f_real: Tensor, f_fake: Tensor) -> float:
    """Unbiased MMD^2 with KID's cubic polynomial kernel on the full sets (N, F), float64.

    torchmetrics averages the same estimator over random subsets; on the full sets it is the
    lowest-variance form, and equals torchmetrics' KID with one subset of every image.
    """
    d = f_real.shape[1]
    k_rr = (f_real @ f_real.T / d + 1) ** 3
    k_ff = (f_fake @ f_fake.T / d + 1) ** 3
    k_rf = (f_real @ f_fake.T / d + 1) ** 3
    m, n = f_real.shape[0], f_fake.shape[0]
    rr = (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
    ff = (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
    return float(rr + ff - 2 * k_rf.mean())


@dataclass(frozen=True)
class QualityCI:
    """FID and KID of one generated set against one held-out set, with intervals."""

    fid: Interval
    kid: Interval
    n_real: int
    n_fake: int


def fid_kid_ci(
    f_real: Tensor, f_fake: Tensor, resamples: int, level: float, seed: int
) -> QualityCI:
    """FID and KID of feature sets (N, F), (M, F) with percentile-bootstrap intervals.

    Both sets are resampled: the interval covers the sampling noise of the generated images and
    of the held-out reference alike. A resample repeats images, which shrinks covariances a
    little; the interval is for comparing arms scored the same way, not an exact coverage.
    """
    f_real, f_fake = f_real.double(), f_fake.double()
    fid, kid = fid_from_features(f_real, f_fake), kid_from_features(f_real, f_fake)
    gen = torch.Generator().manual_seed(seed)
    m, n = f_real.shape[0], f_fake.shape[0]
    fids, kids = [], []
    chunk = 25  # bounds the (B, N, F) copies in memory
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        ir = torch.randint(0, m, (b, m), generator=gen)
        jf = torch.randint(0, n, (b, n), generator=gen)
        fids.append(_fid_batched(f_real[ir], f_fake[jf]))
        kids += [kid_from_features(f_real[ir[k]], f_fake[jf[k]]) for k in range(b)]
    lo_f, hi_f = _percentiles(torch.cat(fids) if fids else torch.empty(0), level)
    lo_k, hi_k = _percentiles(torch.tensor(kids, dtype=torch.float64), level)
    return QualityCI(Interval(fid, lo_f, hi_f), Interval(kid, lo_k, hi_k), m, n)


def spread(values: Tensor, level: float) -> Interval:
    """The mean of repeated estimates (R,) with the central `level` share of them around it."""
    lo, hi = _percentiles(values.double().flatten(), level)
    return Interval(float(values.double().mean()), lo, hi)


def mean_ci(values: Tensor, resamples: int, level: float, seed: int) -> Interval:
    """Mean of per-image values (N,) (a rate, when they are 0/1) with its interval."""
    values = values.double().flatten()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.shape[0], (resamples, values.shape[0]), generator=gen)
    lo, hi = _percentiles(values[idx].mean(1), level)
    return Interval(float(values.mean()), lo, hi)


def auc(members: Tensor, others: Tensor) -> float:
    """Area under the ROC curve of a score that should be higher for members (Mann-Whitney)."""
    return float(_auc_batched(members.double().unsqueeze(0), others.double().unsqueeze(0))[0])


def _auc_batched(members: Tensor, others: Tensor) -> Tensor:
    # (B, M), (B, N) -> (B,); ties count one half.
    greater = (members[:, :, None] > others[:, None, :]).double().mean((1, 2))
    ties = (members[:, :, None] == others[:, None, :]).double().mean((1, 2))
    return greater + 0.5 * ties


def tpr_at_fpr(members: Tensor, others: Tensor, fpr: float) -> float:
    """Share of members scored above the threshold that flags `fpr` of non-members."""
    return float(_tpr_batched(members.double().unsqueeze(0), others.double().unsqueeze(0), fpr)[0])


def _tpr_batched(members: Tensor, others: Tensor, fpr: float) -> Tensor:
    # The smallest threshold with at most `fpr` of non-members strictly above it.
    k = math.floor(fpr * others.shape[1])
    top = others.sort(dim=1, descending=True).values[:, k]  # (B,)
    return (members > top[:, None]).double().mean(1)


@dataclass(frozen=True)
class AttackCI:
    """A membership attack's success with intervals."""

    auc: Interval
    tpr_at_1pct_fpr: Interval
    members: int
    non_members: int


def membership_ci(
    members: Tensor, others: Tensor, resamples: int, level: float, seed: int
) -> AttackCI:
    """AUC and TPR at 1% FPR of scores (higher = member), resampling both groups."""
    members, others = members.double().flatten(), others.double().flatten()
    gen = torch.Generator().manual_seed(seed)
    aucs, tprs = [], []
    chunk = 20
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        mi = members[torch.randint(0, members.shape[0], (b, members.shape[0]), generator=gen)]
        oi = others[torch.randint(0, others.shape[0], (b, others.shape[0]), generator=gen)]
        aucs.append(_auc_batched(mi, oi))
        tprs.append(_tpr_batched(mi, oi, 0.01))
    a_lo, a_hi = _percentiles(torch.cat(aucs), level)
    t_lo, t_hi = _percentiles(torch.cat(tprs), level)
    return AttackCI(
        Interval(auc(members, others), a_lo, a_hi),
        Interval(tpr_at_fpr(members, others, 0.01), t_lo, t_hi),
        members.shape[0],
        others.shape[0],
    )
