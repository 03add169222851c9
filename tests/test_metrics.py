"""Tests of the quality (FID/KID), disclosure (PSNR/SSIM, re-identification) and cost metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from collafuse.common.config import ImageConfig
from collafuse.common.data import FASHION_MNIST_DIR, load_fashion_mnist, to_model_range
from collafuse.common.metrics import (
    ASSET_PATH,
    ClassifierFeatures,
    ClassifierMeta,
    FeatureNet,
    MetricsError,
    classifier_accuracy,
    count_flops,
    fid_kid,
    inception_feature_extractor,
    kid_between,
    load_feature_net,
    psnr,
    reidentification_rate,
    save_feature_net,
    ssim,
)
from collafuse.experiments import train_classifier


@pytest.fixture(scope="module")
def fmnist() -> tuple[Tensor, Tensor]:
    """The 10k Fashion-MNIST test images (N, 1, 28, 28) in [-1, 1] and their labels."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: "
            "install the Debian package dataset-fashion-mnist"
        )
    images, labels = load_fashion_mnist(split="test")
    return to_model_range(images, ImageConfig(channels=1, size=28)), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def net() -> FeatureNet:
    return load_feature_net()


def _by_classes(fmnist: tuple[Tensor, Tensor], classes: range, n: int, skip: int = 0) -> Tensor:
    images, labels = fmnist
    mask = (labels >= classes.start) & (labels < classes.stop)
    return images[mask][skip : skip + n]


def _noised(x: Tensor, sigma: float, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g)


# ----- the committed classifier ----------------------------------------------------------


def test_committed_weights_are_small_and_plain() -> None:
    assert ASSET_PATH.is_file()
    assert ASSET_PATH.stat().st_size < 2 * 1024 * 1024
    checkpoint = torch.load(ASSET_PATH, weights_only=True)  # no pickled code in the asset
    assert checkpoint["meta"]["feature_dim"] == 128


def test_committed_classifier_accuracy(fmnist: tuple[Tensor, Tensor], net: FeatureNet) -> None:
    images, labels = fmnist
    assert not net.training
    assert net.meta is not None and net.meta.test_accuracy >= 0.90
    assert classifier_accuracy(net, images[:2000], labels[:2000]) >= 0.88


def test_feature_net_scores_other_sizes_and_colour(
    fmnist: tuple[Tensor, Tensor], net: FeatureNet
) -> None:
    images, labels = fmnist[0][:500], fmnist[1][:500]
    # RGB at 56 x 56: grey by luma, then resized back to 28 inside the network.
    big_rgb = nn.functional.interpolate(images, size=(56, 56), mode="nearest").repeat(1, 3, 1, 1)
    assert classifier_accuracy(net, big_rgb, labels) >= 0.85
    assert net.features(big_rgb).shape == (500, 128)
    with pytest.raises(MetricsError, match="channels"):
        net(torch.zeros(1, 5, 28, 28))


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FeatureNet(feature_dim=16, widths=(4, 8, 8)).eval()
    meta = ClassifierMeta(test_accuracy=0.5, epochs=1, feature_dim=16, widths=(4, 8, 8))
    save_feature_net(net, meta, tmp_path / "c.pt")
    loaded = load_feature_net(tmp_path / "c.pt")
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded.features(x), net.features(x))
    assert loaded.meta == meta
    with pytest.raises(MetricsError, match="train_classifier"):
        load_feature_net(tmp_path / "missing.pt")


def test_train_classifier_smoke(fmnist: tuple[Tensor, Tensor], tmp_path: Path) -> None:
    out = tmp_path / "clf.pt"
    assert train_classifier.main(["--epochs", "1", "--limit", "256", "--out", str(out)]) == 0
    trained = load_feature_net(out)
    assert trained.meta is not None and trained.meta.epochs == 1
    assert 0.0 <= trained.meta.test_accuracy <= 1.0


# ----- FID and KID -----------------------------------------------------------------------


def test_fid_kid_zero_for_same_set_and_large_for_other_classes(
    fmnist: tuple[Tensor, Tensor], net: FeatureNet
) -> None:
    a = _by_classes(fmnist, range(0, 5), 400)
    a2 = _by_classes(fmnist, range(0, 5), 400, skip=400)  # same distribution, other images
    b = _by_classes(fmnist, range(5, 10), 400)
    same = fid_kid(a, a, net, kid_subset_size=200, kid_subsets=20)
    sibling = fid_kid(a, a2, net, kid_subset_size=200, kid_subsets=20)
    other = fid_kid(a, b, net, kid_subset_size=200, kid_subsets=20)
    assert abs(same.fid) < 1e-6 * other.fid
    assert other.fid > 10 * sibling.fid
    assert abs(same.kid_mean) < 0.02 * other.kid_mean  # unbiased: noise about 0
    assert other.kid_mean > 10 * abs(sibling.kid_mean)
    assert other.kid_mean > 3 * other.kid_std


def test_fid_kid_grow_with_noise(fmnist: tuple[Tensor, Tensor], net: FeatureNet) -> None:
    real = fmnist[0][:300]
    fake = fmnist[0][300:600]
    scores = [
        fid_kid(real, _noised(fake, sigma).clamp(-1, 1), net, kid_subset_size=150, kid_subsets=20)
        for sigma in (0.0, 0.1, 0.3, 0.6)
    ]
    fids = [s.fid for s in scores]
    kids = [s.kid_mean for s in scores]
    assert fids == sorted(fids) and fids[0] < fids[-1] / 10, fids
    assert kids == sorted(kids) and kids[0] < kids[-1] / 10, kids


def test_fid_kid_small_sets_cap_kid_subsets_and_are_seeded(
    fmnist: tuple[Tensor, Tensor], net: FeatureNet
) -> None:
    real, fake = fmnist[0][:5], fmnist[0][100:107]
    result = fid_kid(real, fake, net)
    assert result.kid_subset_size == 5 and (result.n_real, result.n_fake) == (5, 7)
    assert math.isfinite(result.fid) and math.isfinite(result.kid_mean)
    assert fid_kid(real, fake, net, seed=3) == fid_kid(real, fake, net, seed=3)
    with pytest.raises(MetricsError, match="at least 2"):
        fid_kid(real[:1], fake, net)


def test_classifier_features_plug_into_torchmetrics(
    fmnist: tuple[Tensor, Tensor], net: FeatureNet
) -> None:
    real, fake = fmnist[0][:200], _noised(fmnist[0][200:400], 0.2)
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(net))
    metric.update(real, real=True)  # [-1, 1] float images go straight in
    metric.update(fake, real=False)
    assert float(metric.compute()) == pytest.approx(fid_kid(real, fake, net).fid, rel=1e-6)


def test_kid_between_grows_with_cut_noise(fmnist: tuple[Tensor, Tensor], net: FeatureNet) -> None:
    data = fmnist[0][:300]
    other = fmnist[0][300:600]
    eps = _noised(torch.zeros_like(data), 1.0, seed=1)
    kids = [
        kid_between(math.sqrt(abar) * data + math.sqrt(1 - abar) * eps, other, net, 150, 20)
        for abar in (0.99, 0.7, 0.2)
    ]
    assert kids == sorted(kids) and kids[0] < kids[-1] / 10, kids


def test_inception_extractor_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="does not exist"):
        inception_feature_extractor(tmp_path / "missing.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": Path("not a tensor")}, pickled)  # needs full unpickling to load
    with pytest.raises(MetricsError, match="refusing to unpickle"):
        inception_feature_extractor(pickled)
    if not _TORCH_FIDELITY_AVAILABLE:
        plain = tmp_path / "plain.pth"
        torch.save({"w": torch.zeros(1)}, plain)
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            inception_feature_extractor(plain)


# ----- PSNR and SSIM ---------------------------------------------------------------------


def test_psnr_matches_formula_and_falls_with_noise() -> None:
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    step = torch.full_like(x, 0.1)
    torch.testing.assert_close(psnr(x, x + step), torch.full((4,), 10 * math.log10(4 / 0.01)))
    noisy = _noised(x, 0.2)
    mse = (noisy - x).square().flatten(1).mean(dim=1)
    torch.testing.assert_close(psnr(x, noisy), 10 * torch.log10(4 / mse))
    values = [psnr(x, _noised(x, s)).mean().item() for s in (0.05, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]
    with pytest.raises(MetricsError, match="one shape"):
        psnr(x, x[:2])


def test_ssim_is_one_on_itself_and_falls_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # some structure, not white noise
    same = ssim(x, x)
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.ones(3))
    values = [ssim(x, _noised(x, s)).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 1 > values[0] > values[1] > values[2]
    small = torch.rand(2, 1, 8, 8, generator=g)  # digits-sized: a smaller window
    torch.testing.assert_close(ssim(small, small), torch.ones(2))


# ----- re-identification -----------------------------------------------------------------


def test_reidentification_rate(fmnist: tuple[Tensor, Tensor], net: FeatureNet) -> None:
    originals, distractors = fmnist[0][:100], fmnist[0][100:500]
    assert reidentification_rate(originals, originals, distractors) == 1.0
    assert reidentification_rate(originals, originals, distractors, net=net) == 1.0
    # Mild reconstruction error still points at the right image.
    assert reidentification_rate(_noised(originals, 0.1), originals, distractors) >= 0.95
    # Pure noise carries no identity: about 1 / 500 hits.
    noise = _noised(torch.zeros_like(originals), 1.0)
    assert reidentification_rate(noise, originals, distractors) <= 0.03
    assert reidentification_rate(noise, originals, distractors, net=net) <= 0.05
    # Without distractors, swapping the reconstructions fails every one.
    assert reidentification_rate(originals.flip(0), originals, distractors[:0]) == 0.0


def test_reidentification_rejects_mismatched_shapes() -> None:
    with pytest.raises(MetricsError):
        reidentification_rate(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8), torch.zeros(0))


# ----- FLOPs -----------------------------------------------------------------------------


def test_count_flops_of_linear_forward_and_backward() -> None:
    batch, n_in, n_out = 8, 32, 16
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in)
    assert count_flops(lambda: layer(x)) == 2 * n_in * n_out * batch
    # Backward adds the weight gradient (same size) and, for an input needing grad, its gradient.
    x.requires_grad_(True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * n_in * n_out * batch
