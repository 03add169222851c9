"""Study-only metrics: FID/KID on classifier features, reconstruction and re-identification.

Quality: FID and KID (torchmetrics) on the penultimate features of a small Fashion-MNIST
classifier trained in this repository (`FeatureNet`, weights committed under `common/assets/`),
or on Inception-v3 features from a weights file the user supplies. Numbers from the two feature
spaces are not comparable with each other, and neither is comparable with FIDs published on
Inception features of other data sets; compare runs scored with the same extractor only.

Disclosure (docs/design.md §4): per-image reconstruction PSNR/SSIM of what an attacker rebuilt
from the cut images, the re-identification of those reconstructions among the client's images
and distractors, and `kid_between`, the paper's KID between what the server saw at the cut and
the client's training images.

These live with the study, not in `collafuse.common`: the server and client never score images,
and torchmetrics is a dependency of the `experiments` extra only.

All image tensors are (N, C, H, W) float in [-1, 1], the model range of `collafuse.common.data`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

# resolve(): a strict editable install links each module file from elsewhere; follow the link so
# the asset is read from, and written to, the source tree. The weights stay in common/assets/
# (package data of collafuse.common), one level up from this package in both layouts.
ASSET_PATH = Path(__file__).resolve().parents[1] / "common" / "assets" / "fmnist_classifier.pt"
"""The committed classifier: `python -m collafuse.experiments.train_classifier` rewrites it."""
CHECKPOINT_FORMAT = "collafuse-fmnist-classifier/1"
INPUT_SIZE = 28
"""FeatureNet sees 28 x 28 grey images; other sizes and colour images are converted first."""
DATA_RANGE = 2.0
"""Width of the model range [-1, 1]; PSNR and SSIM use it as the peak signal."""
# ITU-R 601 luma weights, as in Pillow's RGB -> L and collafuse.common.data.
_LUMA = (0.299, 0.587, 0.114)
_SSIM_KERNEL = 11
_SSIM_SIGMA = 1.5


class MetricsError(ValueError):
    """Inputs a metric cannot score as given; the message says what is wrong."""


# ----- the feature network ---------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierMeta:
    """What the training run recorded beside the classifier's weights."""

    test_accuracy: float
    """Accuracy on the 10,000 Fashion-MNIST test images."""
    epochs: int
    """Passes over the 60,000 training images."""
    feature_dim: int
    """Width of the penultimate layer, the features FID and KID compare."""
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)
    """Channels of the three convolution stages."""
    train_seconds: float = 0.0
    """Wall-clock training time of the run that made the weights."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierMeta:
        widths = tuple(int(w) for w in data.get("widths", (16, 32, 64)))
        if len(widths) != 3:
            raise MetricsError(f"classifier widths must have three entries, not {widths}")
        return cls(
            test_accuracy=float(data["test_accuracy"]),
            epochs=int(data["epochs"]),
            feature_dim=int(data["feature_dim"]),
            num_classes=int(data.get("num_classes", 10)),
            widths=(widths[0], widths[1], widths[2]),
            train_seconds=float(data.get("train_seconds", 0.0)),
        )


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    # conv-BN-ReLU, then halve the resolution (28 -> 14 -> 7 -> 3).
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def to_grey_28(x: Tensor) -> Tensor:
    """(N, C, H, W) images in [-1, 1] (or uint8 in [0, 255]) -> (N, 1, 28, 28) float32 in [-1, 1].

    Colour becomes grey by ITU-R 601 luma (an alpha or second channel is dropped), non-square
    images are centre-cropped, and other sizes are resized with antialiased bilinear
    interpolation, so FeatureNet can score other data sets roughly.
    """
    if x.ndim != 4:
        raise MetricsError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
    channels = x.shape[1]
    if channels in (3, 4):
        luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x[:, :3] * luma).sum(dim=1, keepdim=True)
    elif channels in (1, 2):
        x = x[:, :1]
    else:
        raise MetricsError(f"expected 1 to 4 channels, got {channels}")
    h, w = x.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top : top + side, left : left + side]
    if x.shape[-1] != INPUT_SIZE:
        x = F.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    return x  # (N, 1, 28, 28)


class FeatureNet(nn.Module):
    """A small Fashion-MNIST CNN: three conv stages, a `feature_dim` layer, a linear classifier.

    `forward` returns class logits; `features` returns the penultimate activations that FID and
    KID compare. Both accept any (N, C, H, W) image batch in [-1, 1] (see `to_grey_28`).
    """

    def __init__(
        self,
        feature_dim: int = 128,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.widths = widths
        c1, c2, c3 = widths
        self.body = nn.Sequential(_stage(1, c1), _stage(c1, c2), _stage(c2, c3))
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 3 * 3, feature_dim), nn.ReLU(inplace=True)
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        self.meta: ClassifierMeta | None = None
        """Set by `load_feature_net` from the checkpoint; None for a fresh network."""

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim) penultimate activations."""
        return self.embed(self.body(to_grey_28(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, num_classes) logits."""
        return self.head(self.features(x))


def save_feature_net(net: FeatureNet, meta: ClassifierMeta, path: Path) -> None:
    """Write the state dict and `meta` as plain tensors and values (loadable with weights_only)."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state, "meta": meta.to_dict()}, path)


def load_feature_net(path: Path | None = None, device: str | torch.device = "cpu") -> FeatureNet:
    """The committed classifier (or the one at `path`) in eval mode, with its `meta` set."""
    path = ASSET_PATH if path is None else Path(path)
    if not path.is_file():
        raise MetricsError(
            f"classifier weights {path} do not exist; "
            "run `python -m collafuse.experiments.train_classifier` to make them"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise MetricsError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    meta = ClassifierMeta.from_dict(checkpoint["meta"])
    net = FeatureNet(meta.feature_dim, meta.num_classes, meta.widths)
    net.load_state_dict(checkpoint["state_dict"])
    net.meta = meta
    return net.to(device).eval().requires_grad_(False)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def classifier_accuracy(
    net: FeatureNet, images: Tensor, labels: Tensor, batch_size: int = 1000
) -> float:
    """Share of `images` (N, C, H, W) in [-1, 1] whose arg-max logit equals `labels` (N,)."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise MetricsError(f"{images.shape[0]} images and {labels.shape[0]} labels")
    was_training = net.training
    net.eval()
    device = _device_of(net)
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = net(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
    net.train(was_training)
    return correct / images.shape[0]


# ----- feature extractors for torchmetrics -------------------------------------------------


class FeatureExtractor(nn.Module):
    """Images (N, C, H, W) in [-1, 1] -> features (N, num_features) float64.

    The form torchmetrics' FrechetInceptionDistance and KernelInceptionDistance take as
    `feature=`: they read `num_features` instead of probing the network with a dummy uint8
    299 x 299 RGB image, and with a custom module they pass `update`'s images through unchanged
    (their `normalize` flag only affects the built-in Inception), so our [-1, 1] tensors work.
    """

    num_features: int


class ClassifierFeatures(FeatureExtractor):
    """FeatureNet's penultimate activations as a torchmetrics feature extractor."""

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net.eval()
        self.num_features = net.feature_dim

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x.to(_device_of(self.net))).double()  # (N, feature_dim)


class InceptionFeatures(FeatureExtractor):
    """torchmetrics' Inception-v3 (torch-fidelity's port) behind our [-1, 1] interface."""

    def __init__(self, inception: nn.Module, num_features: int) -> None:
        super().__init__()
        self.inception = inception
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise MetricsError(f"expected (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # The network takes uint8 RGB and resizes to 299 x 299 itself.
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out: Tensor = self.inception(pixels.to(_device_of(self.inception)))
        return out.double()  # (N, num_features)


def inception_feature_extractor(weights: Path, feature: int = 2048) -> InceptionFeatures:
    """Inception-v3 pool features from a weights file the user supplies; never downloads.

    `weights` is torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the TF FID
    Inception converted to a PyTorch state dict), fetched by the user on a machine with internet.
    torchmetrics builds this network from the `torch-fidelity` package, which is not a
    dependency of CollaFuse: `pip install torch-fidelity` (torchmetrics' `image` extra), which
    in turn needs a working `torchvision`. Without them this raises ModuleNotFoundError; on the
    project's own machines, where torchvision is absent, only the in-repo classifier works.
    torch-fidelity unpickles the file, so it is first checked to load with `weights_only=True`.
    `feature` picks the layer: 64, 192, 768 or 2048 (the standard FID features).
    """
    weights = Path(weights)
    if feature not in (64, 192, 768, 2048):
        raise MetricsError(f"Inception feature must be 64, 192, 768 or 2048, not {feature}")
    if not weights.is_file():
        raise MetricsError(f"Inception weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricsError(
            f"{weights} is not a plain PyTorch state dict (refusing to unpickle it): {exc}"
        ) from None
    if not isinstance(state, dict):
        raise MetricsError(f"{weights} holds a {type(state).__name__}, not a state dict")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "Inception features need the torch-fidelity package (and a working torchvision): "
            "`pip install torch-fidelity`; or score with the in-repo classifier, "
            "load_feature_net()"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(feature)],
        feature_extractor_weights_path=str(weights),
    )
    return InceptionFeatures(inception, feature)


def as_feature_extractor(net: FeatureNet | FeatureExtractor) -> FeatureExtractor:
    """Wrap a FeatureNet as a FeatureExtractor; pass an extractor through."""
    return ClassifierFeatures(net) if isinstance(net, FeatureNet) else net


def extract_features(
    images: Tensor, net: FeatureNet | FeatureExtractor, batch_size: int = 500
) -> Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, F) float64 features on the CPU, in batches."""
    extractor = as_feature_extractor(net)
    chunks = [
        extractor(images[start : start + batch_size]).cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    if not chunks:
        return torch.empty((0, extractor.num_features), dtype=torch.float64)
    return torch.cat(chunks)


# ----- FID and KID -----------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Identity 'network' so torchmetrics' FID/KID math runs on features extracted once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@dataclass(frozen=True)
class FidKid:
    """FID and KID between a real and a generated set, in one feature space."""

    fid: float
    kid_mean: float
    """Mean unbiased MMD^2 (cubic polynomial kernel) over random subsets."""
    kid_std: float
    """Standard deviation of the subset estimates, a rough error bar for kid_mean."""
    n_real: int
    n_fake: int
    kid_subset_size: int
    """Images per KID subset actually used: the request, capped at min(n_real, n_fake)."""


def _check_sets(a: Tensor, b: Tensor) -> None:
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise MetricsError(
            f"FID and KID need at least 2 images in each set, got {a.shape[0]} and {b.shape[0]}"
        )


def _fid_from_features(f_real: Tensor, f_fake: Tensor) -> float:
    metric = FrechetInceptionDistance(feature=_Precomputed(f_real.shape[1]))
    metric.update(f_real, real=True)
    metric.update(f_fake, real=False)
    # torchmetrics accumulates in float64 and returns the dtype of the features (float64 here).
    return float(metric.compute())


def _kid_from_features(
    f_real: Tensor, f_fake: Tensor, subset_size: int, subsets: int, seed: int
) -> tuple[float, float, int]:
    size = min(subset_size, f_real.shape[0], f_fake.shape[0])
    if size < 2:
        raise MetricsError(f"KID needs subsets of at least 2 images, got {size}")
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": intended; features here are small.
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Precomputed(f_real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(f_real, real=True)
    metric.update(f_fake, real=False)
    # KID draws its subsets with torch.randperm on the global generator: seed a private copy.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def fid_kid(
    real: Tensor,
    fake: Tensor,
    net: FeatureNet | FeatureExtractor,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 500,
) -> FidKid:
    """FID and KID of `fake` against `real`, both (N, C, H, W) in [-1, 1], in `net`'s features.

    Features are extracted once per set and fed to torchmetrics' metrics. Works from 2 images per
    set: the KID subset size is capped at min(n_real, n_fake). With fewer images than feature
    dimensions the covariances are singular and FID is biased upwards; compare FIDs only at
    equal sample sizes. KID is unbiased and the better choice for small sets.
    """
    _check_sets(real, fake)
    f_real = extract_features(real, net, batch_size)  # (N_real, F)
    f_fake = extract_features(fake, net, batch_size)  # (N_fake, F)
    fid = _fid_from_features(f_real, f_fake)
    kid_mean, kid_std, size = _kid_from_features(f_real, f_fake, kid_subset_size, kid_subsets, seed)
    return FidKid(fid, kid_mean, kid_std, real.shape[0], fake.shape[0], size)


def kid_between(
    a: Tensor,
    b: Tensor,
    net: FeatureNet | FeatureExtractor,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> float:
    """KID between two image sets; the paper's disclosure measure.

    Pass what the server saw at the cut (the cut images x_c) as `a` and the client's training
    images as `b`: a small value means the cut images still look like the data to the feature
    network, a large one that the noise hides it.
    """
    _check_sets(a, b)
    mean, _, _ = _kid_from_features(
        extract_features(a, net), extract_features(b, net), kid_subset_size, kid_subsets, seed
    )
    return mean


# ----- reconstruction attacks ------------------------------------------------------------


def _check_pairs(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise MetricsError(
            f"expected two image batches (N, C, H, W) of one shape, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """(N,) peak signal-to-noise ratio in dB per image pair, peak = 2 (the range [-1, 1]).

    10 log10(4 / mse), with the mean over channels and pixels; inf for identical images. Inputs
    are not clipped: clip reconstructions to [-1, 1] first if that is what an attacker would do.
    """
    _check_pairs(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)  # (N,)
    return (10.0 * torch.log10(DATA_RANGE**2 / mse)).float()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """(N,) structural similarity per image pair, Gaussian window (11, sigma 1.5), range 2.

    torchmetrics' SSIM averaged over channels and pixels; 1 for identical images. Images smaller
    than 11 pixels use the largest odd window that fits. Inputs are not clipped.
    """
    _check_pairs(x, y)
    side = min(x.shape[-2:])
    kernel = _SSIM_KERNEL if side >= _SSIM_KERNEL else side - (1 - side % 2)
    if kernel < 3:
        raise MetricsError(f"SSIM needs images of at least 3 x 3 pixels, got {tuple(x.shape)}")
    out = structural_similarity_index_measure(
        x.float(),
        y.float(),
        gaussian_kernel=True,
        sigma=_SSIM_SIGMA,
        kernel_size=kernel,
        data_range=DATA_RANGE,
        reduction="none",
    )
    # A tuple comes back only with return_full_image or return_contrast_sensitivity.
    return cast(Tensor, out)


@torch.no_grad()
def reidentification_rate(
    reconstructions: Tensor,
    originals: Tensor,
    distractors: Tensor,
    net: FeatureNet | FeatureExtractor | None = None,
    batch_size: int = 256,
) -> float:
    """Share of reconstructions whose nearest neighbour among originals ∪ distractors is its own.

    The mean of `reidentification_hits`; see there.
    """
    hits = reidentification_hits(reconstructions, originals, distractors, net, batch_size)
    return float(hits.double().mean())


@torch.no_grad()
def reidentification_hits(
    reconstructions: Tensor,
    originals: Tensor,
    distractors: Tensor,
    net: FeatureNet | FeatureExtractor | None = None,
    batch_size: int = 256,
) -> Tensor:
    """(N,) bool: whether reconstruction i's nearest neighbour among originals ∪ distractors is
    original i (per image, so a study can bootstrap the rate).

    `reconstructions[i]` is an attacker's estimate of `originals[i]`; `distractors` are other
    images of the same kind (say, other clients' or test images). Distance is L2 in pixel space,
    or in `net`'s feature space when `net` is given. Chance level is about
    1 / (len(originals) + len(distractors)); 1.0 means every image was re-identified. Exact
    distance ties go to the originals.
    """
    _check_pairs(reconstructions, originals)
    if distractors.ndim != 4 or distractors.shape[1:] != originals.shape[1:]:
        raise MetricsError(
            f"distractors {tuple(distractors.shape)} must be images shaped like the originals "
            f"{tuple(originals.shape)}"
        )
    n = reconstructions.shape[0]
    if n == 0:
        raise MetricsError("no reconstructions to score")
    candidates = torch.cat([originals, distractors])  # (N + D, C, H, W)
    if net is None:
        queries = reconstructions.flatten(1).double()
        keys = candidates.flatten(1).double()
    else:
        queries = extract_features(reconstructions, net)
        keys = extract_features(candidates, net)
    hits = []
    for start in range(0, n, batch_size):
        distances = torch.cdist(queries[start : start + batch_size], keys)  # (B, N + D)
        nearest = distances.argmin(dim=1)
        hits.append(nearest == torch.arange(start, start + nearest.shape[0]))
    return torch.cat(hits)  # (N,)
