"""Server policy: which registrations and uploads are refused, and the upload guard.

What the upload guard checks (`Policy.check_batch`). An honest cut image is
x_c = sqrt(abar) x0 + sqrt(1 - abar) eps at the client's registered t_cut, with x0 in [-1, 1]
and eps i.i.d. N(0, 1), drawn afresh for every image. The guard refuses uploads that contradict
that model. Every bound holds for *any* x0 in [-1, 1] (a worst case, not a model of the data)
and is set so that each test refuses an honest image, or an honest message, with probability at
most 1e-9 (exact chi-square and Gaussian tails, union bounds over pixels and pairs); the
thresholds scale with the number of pixels. Per image:

- every value is finite;
- amplitude: |x_c| <= sqrt(abar) + k sqrt(1 - abar), k the Gaussian tail point for 1e-9 spread
  over the pixels (k = 6.7 on 8x8, 7.1 on 28x28);
- mean over pixels within sqrt(abar) + z sqrt((1 - abar) / pixels);
- variance over pixels between the chi-square floor of the noise alone (about 0.26 (1 - abar) on
  8x8, 0.73 (1 - abar) on 28x28) and abar + (1 - abar) plus sampling slack (var(x0) <= 1);
- noise floor: the robust noise estimate (MAD of finite differences) at least
  `guard_ratio` x sqrt(1 - abar) (the raw-image guard of DESIGN section 4; an estimate, with a
  measured rather than derived false-refusal rate, roughly 1e-8 per 8x8 image).

Per message, over the images that passed: no two ids carry the same or nearly the same tensor
(two independent cuts differ by at least their noise difference, a chi-square floor); the
message's mean variance lies in the same window with the pooled degrees of freedom (64 images of
8x8 pin the noise std to within about 7%); and from 4096 pixels on, the pooled excess kurtosis
lies in [-2 abar^2, abar / (1 - abar)] widened by 8 (below) and 12 (above) standard errors (a
normal approximation with a wide margin, checked by simulation), which refuses noise far
lighter-tailed (uniform) or heavier-tailed (Laplace) than Gaussian. A refused image gets a short
reason that says what to fix; a failed per-message test refuses every image of that message;
the other images and messages of the upload are stored.

What it cannot catch. A valid-looking cut of any other x0 in [-1, 1] is, by construction, an honest
upload: adversarially chosen, mislabelled, off-distribution or backdoored images noised correctly
pass, and so do poisoning within the data range (a client contributing junk under its own id, or
many Sybil clients) and slow drift over many uploads. It cannot prove the noise is fresh and
secret: a tensor re-sent under a new id in a later message, one eps reused for two different images
(only flagged when the images are close), or eps that looks Gaussian but is predictable or
correlated with x0 all pass. Mild departures hide in the slack: one 8x8 image sent alone may carry
about half the declared noise std and pass (64 in one message cannot), and a few clean images mixed
into a large honest message can pass the noise floor on 8x8; non-Gaussian noise whose kurtosis
stays in the window passes (uniform noise at abar near 0.5, where x0 in [-1, 1] alone can lower the
kurtosis to -0.5), and small messages skip the kurtosis test. The trainer has its own defence
against what slips through: it skips non-finite steps, rolls back non-finite weights and never
saves or publishes them (server/trainer.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from collafuse.common.config import ImageConfig, PolicyConfig
from collafuse.common.diffusion import Diffusion
from collafuse.common.domain import CutBatch, Registration

# A Gaussian's standard deviation is its median absolute deviation divided by this.
_MAD_TO_STD = 0.6744897501960817


class Refusal(Enum):
    """How a refusal maps onto gRPC status codes."""

    INVALID_ARGUMENT = "invalid_argument"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    UNAVAILABLE = "unavailable"


class PolicyError(Exception):
    """A request the server refuses; `kind` chooses the status code, the message says why."""

    def __init__(self, kind: Refusal, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _differences(images: Tensor) -> np.ndarray:
    """Per image, its horizontal and vertical finite differences as float32 rows, (N, D)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).flatten(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).flatten(1)
    return torch.cat([dx, dy], dim=1).to(torch.float32).numpy()


def measure_noise_std(images: Tensor) -> Tensor:
    """Robust per-image noise std: the MAD of horizontal and vertical finite differences.

    A difference of two pixels carries sqrt(2) times the pixel noise, while the image's own
    differences are sparse (flat regions), so the median ignores edges. Shape (N,C,H,W) -> (N,).
    """
    d = _differences(images)
    mad = _lower_median(np.abs(d - _lower_median(d)[:, None]))
    return torch.from_numpy(mad).to(images.dtype) / _MAD_TO_STD / math.sqrt(2.0)


def noise_below(images: Tensor, floor: float) -> Tensor:
    """Per image, whether `measure_noise_std(images) < floor`, at about half its cost.

    The MAD is the lower median of |d - centre|, so it lies below a threshold exactly when
    more than half of those deviations do: one count replaces the second selection. (Equal
    to the estimate's test up to float32 rounding at the threshold itself.) Shape (N,) bool.
    """
    d = _differences(images)
    k = (d.shape[1] - 1) // 2
    centre = torch.from_numpy(_lower_median(d))
    threshold = floor * _MAD_TO_STD * math.sqrt(2.0)
    # In place on one temporary: 1.0 where a deviation is below the threshold, else 0.0.
    close = (torch.from_numpy(d) - centre[:, None]).abs_().lt_(threshold).sum(dim=1)
    return close > k


def _lower_median(rows: np.ndarray) -> np.ndarray:
    """Per row, the lower of the two middle values (torch.median's convention).

    A selection (np.partition) instead of torch.median's sort halves its cost.
    """
    k = (rows.shape[1] - 1) // 2
    return np.partition(rows, k, axis=1)[:, k]


def guard_ratio(tolerance: float, shape: tuple[int, int, int]) -> float:
    """Share of the declared noise std an upload must show, given the image size.

    On pure noise the estimate's relative spread is about 1.45 / sqrt(number of differences)
    (measured); the floor stays 4.5 spreads below 1 so honest uploads are not refused. On
    28x28 images that is the configured tolerance; on 8x8 images it drops to about 0.38.
    """
    c, h, w = shape
    spread = 1.45 / math.sqrt(c * (h * (w - 1) + (h - 1) * w))
    return max(0.0, min(tolerance, 1.0 - 4.5 * spread))


# ----- the upload guard's statistics ---------------------------------------------------------
#
# Every bound below is a worst case over all x0 in [-1, 1] (never a model of the data) under the
# honest model x_c = a x0 + s eps, a = sqrt(abar), s = sqrt(1 - abar), eps i.i.d. N(0, 1) and
# independent of x0 and of every other image. Each is set so that one test refuses one honest
# image (per-image tests) or one honest message (per-message tests) with probability at most
# FALSE_REFUSAL; by the union bound the seven such tests refuse an honest image with probability
# under 1e-8. The older MAD noise floor (guard_ratio) is the exception: an estimate, not a bound;
# on 8x8 pure noise its 1e-6 quantile is 0.47 of the true std (8 million draws, none below
# 0.43), which extrapolates to roughly 1e-8 at its floor of 0.38; on 28x28 it is far safer.

FALSE_REFUSAL = 1e-9
"""Budget of one test: the chance it refuses one honest image, or one honest message."""

KURTOSIS_MIN_PIXELS = 4096
"""The kurtosis test runs on messages with at least this many pixels (64 images of 8x8, 6 of
28x28): below it the sample kurtosis is too skewed for a normal tail bound."""

KURTOSIS_Z_LOW = 8.0
KURTOSIS_Z_HIGH = 12.0
"""Width of the kurtosis window in standard errors sqrt(24 / pixels). On honest data the sample
excess kurtosis is right-skewed: in 400,000 draws of 4096 Gaussian pixels its 1e-5 quantiles sit
at -3.7 and +4.8 standard errors (a normal has -/+4.3), so the lower side keeps 8 (a normal
tail of 6e-16 against the budget's 6.0) and the heavier upper side 12."""


@dataclass(frozen=True)
class CutBounds:
    """What one honest cut image at a given abar and size can show, at FALSE_REFUSAL each."""

    amplitude: float
    """Largest |pixel|: a + k s with P(some |eps_i| > k) <= budget (union over the pixels)."""
    mean: float
    """Largest |mean over pixels|: a + z s / sqrt(pixels); mean(x0) in [-1, 1], mean(eps)
    ~ N(0, 1 / pixels)."""
    var_low: float
    """Smallest variance over pixels: s^2 q_lo(pixels - 1) / pixels. Given x0 the centred sum
    of squares is s^2 times a noncentral chi-square with pixels - 1 degrees of freedom, which
    is never smaller in distribution than the central one, whatever x0 is."""
    var_high: float
    """Largest variance over pixels: a^2 + 2 a s z / sqrt(pixels) + s^2 q_hi(pixels - 1) /
    pixels. var(x0) <= 1 on [-1, 1]; the cross term <x0 - mean, eps> / pixels is
    N(0, var(x0) / pixels); each of the two tails takes half the budget."""


def normal_upper_quantile(p: float) -> float:
    """z with P(Z > z) = p for a standard normal Z (accurate far into the tail)."""
    return -NormalDist().inv_cdf(p)


@functools.lru_cache(maxsize=4096)
def chi2_quantile(dof: int, p: float, upper: bool) -> float:
    """q with P(X <= q) = p, or P(X >= q) = p when `upper`, for X ~ chi-square(dof).

    Bisection on the regularised incomplete gamma function in float64; it matches scipy's
    chi2.ppf/isf to 12 digits for dof 15..786432 and p down to 1e-13.
    """
    k = torch.tensor(dof / 2.0, dtype=torch.float64)
    lo, hi = 0.0, dof + 40.0 * math.sqrt(2.0 * dof) + 400.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        x = torch.tensor(mid / 2.0, dtype=torch.float64)
        tail = torch.special.gammaincc(k, x) if upper else torch.special.gammainc(k, x)
        # Upper: the tail shrinks as q grows; lower: the CDF grows with q.
        if (float(tail) > p) == upper:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=1024)
def cut_bounds(abar: float, pixels: int, p: float = FALSE_REFUSAL) -> CutBounds:
    """The per-image bounds of an honest cut at `abar` with `pixels` values (C * H * W)."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    z_half = normal_upper_quantile(p / 2.0)
    return CutBounds(
        amplitude=a + s * normal_upper_quantile(p / (2.0 * pixels)),
        mean=a + s * z_half / math.sqrt(pixels),
        var_low=s * s * chi2_quantile(pixels - 1, p, upper=False) / pixels,
        var_high=a * a
        + 2.0 * a * s * z_half / math.sqrt(pixels)
        + s * s * chi2_quantile(pixels - 1, p / 2.0, upper=True) / pixels,
    )


def pooled_variance_bounds(
    abar: float, pixels: int, images: int, p: float = FALSE_REFUSAL
) -> tuple[float, float]:
    """Window for the mean of the per-image variances of `images` honest cuts.

    The images' noise is independent, so the centred sums of squares add up to s^2 times a
    noncentral chi-square with images * (pixels - 1) degrees of freedom (floor as in
    CutBounds.var_low) and the cross terms to N(0, sum of var(x0) * pixels) (ceiling as in
    CutBounds.var_high). With many pixels the window narrows to about
    [s^2 (1 - 6 sqrt(2 / dof)), abar + s^2 (1 + 6 sqrt(2 / dof))].
    """
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    dof = images * (pixels - 1)
    total = images * pixels
    low = s * s * chi2_quantile(dof, p, upper=False) / total
    high = (
        a * a
        + 2.0 * a * s * normal_upper_quantile(p / 2.0) / math.sqrt(total)
        + s * s * chi2_quantile(dof, p / 2.0, upper=True) / total
    )
    return low, high


def kurtosis_window(abar: float, total_pixels: int) -> tuple[float, float]:
    """Window for the pooled excess kurtosis of an honest message with `total_pixels` values.

    Pooled over the message, the pixels are b + s eps with b = a x0 in [-a, a]. Cumulants of
    independent parts add and a Gaussian's fourth cumulant is 0, so the excess kurtosis is
    k4(b) / (var(b) + s^2)^2. Any distribution has k4 >= -2 var^2 and var(b) <= a^2, which
    gives >= -2 abar^2 (reached by x0 = +-1 at random); and k4(b) <= 4 a^2 var(b), since
    |b - mean b| <= 2 a, which gives <= a^2 / s^2 = SNR. Then KURTOSIS_Z_* standard errors.
    """
    se = math.sqrt(24.0 / total_pixels)
    return (
        -2.0 * abar * abar - KURTOSIS_Z_LOW * se,
        abar / (1.0 - abar) + KURTOSIS_Z_HIGH * se,
    )


def excess_kurtosis(values: Tensor) -> float:
    """Sample excess kurtosis m4 / m2^2 - 3 of all values, centred once.

    Elementwise in float32; each row (image) is summed in float32 and the row sums in float64,
    so the error stays near float32's own (1e-7), far below any window's width.
    """
    x = values.reshape(values.shape[0] if values.ndim > 1 else 1, -1).to(torch.float32)
    n = x.numel()
    d = x - float(x.sum(dim=1).double().sum()) / n
    d2 = d.square()
    m2 = float(d2.sum(dim=1).double().sum()) / n
    m4 = float(d2.square().sum(dim=1).double().sum()) / n
    return m4 / (m2 * m2) - 3.0 if m2 > 0 else -3.0


NEAR_DUPLICATE_BLOCK = 4096
"""Near duplicates are searched among this many images at a time (a client's 1 MiB message holds
at most 4096 8x8 images), so a 16 MiB message of tiny images costs seconds, not minutes; exact
duplicates are found across the whole message."""


def nearest_other(
    flat: Tensor, ids: list[str], block: int = NEAR_DUPLICATE_BLOCK, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """For each row of `flat` (N, D): squared distance to the nearest row of another id within
    its block of `block` rows, and that row's index; exact copies anywhere count as distance 0.
    Rows under one id are a re-send (the pool keeps one), not a duplicate.

    Chunked Gram matrices in float32 on centred data, so memory stays at chunk x block.
    """
    n = flat.shape[0]
    x = flat.to(torch.float32)
    codes: dict[str, int] = {}
    group = torch.tensor([codes.setdefault(i, len(codes)) for i in ids])  # (N,)
    best = torch.full((n,), math.inf)
    where = torch.arange(n)
    for first in range(0, n, block):
        xb = x[first : first + block]
        xb = xb - xb.mean(dim=0, keepdim=True)
        gb = group[first : first + block]
        sq = xb.square().sum(dim=1)  # (b,)
        for start in range(0, xb.shape[0], chunk):
            rows = slice(start, start + chunk)
            d2 = sq[rows, None] + sq[None, :] - 2.0 * (xb[rows] @ xb.T)  # (chunk, b)
            d2 = d2.masked_fill(gb[rows, None] == gb[None, :], math.inf)
            dist, idx = d2.min(dim=1)
            best[first + start : first + start + dist.numel()] = dist
            where[first + start : first + start + dist.numel()] = idx + first
    if n > block:  # exact copies in different blocks: equal rows share one unique index
        _, inverse = torch.unique(x, dim=0, return_inverse=True)  # (N,)
        index = torch.arange(n)
        size = int(inverse.max()) + 1
        # Per set of equal rows, the row with the smallest and with the largest id code; a set
        # with two codes pairs each member with a row of the other code.
        key = group * n + index
        low = torch.full((size,), n * n).scatter_reduce(0, inverse, key, "amin")
        high = torch.full((size,), -1).scatter_reduce(0, inverse, key, "amax")
        low_id, high_id = low[inverse] // n, high[inverse] // n
        copied = low_id != high_id
        twin = torch.where(group == low_id, high[inverse] % n, low[inverse] % n)
        best = torch.where(copied, 0.0, best)
        where = torch.where(copied, twin, where)
    return best.clamp_min(0.0), where


@dataclass(frozen=True)
class Policy:
    """What the server accepts."""

    config: PolicyConfig
    image: ImageConfig
    diffusion: Diffusion

    def check_registration(self, reg: Registration) -> int:
        """Validate a registration and return its t_cut; raise PolicyError when refused."""
        if reg.image_shape != self.image.shape:
            raise PolicyError(
                Refusal.INVALID_ARGUMENT,
                f"image_shape {list(reg.image_shape)} does not match the server's "
                f"{list(self.image.shape)}; resize your images to that shape",
            )
        if reg.schedule_hash and reg.schedule_hash != self.diffusion.hash:
            raise PolicyError(
                Refusal.FAILED_PRECONDITION,
                f"schedule hash {reg.schedule_hash} differs from the server's "
                f"{self.diffusion.hash}; "
                "register with an empty hash to adopt the server's schedule",
            )
        if reg.exposure != "fixed":
            raise PolicyError(
                Refusal.FAILED_PRECONDITION,
                "only fixed exposure is served: each image is released once, at t_cut",
            )
        t_cut = self.diffusion.t_cut(reg.cut_ratio)
        snr = self.diffusion.snr(t_cut)
        if snr > self.config.max_release_snr:
            t_min = self.diffusion.equivalent_timestep(self.config.max_release_snr)
            raise PolicyError(
                Refusal.FAILED_PRECONDITION,
                f"cut_ratio {reg.cut_ratio} gives t_cut={t_cut} with release SNR {snr:.3g}, "
                f"above the policy limit {self.config.max_release_snr:g}; use cut_ratio >= "
                f"{t_min / self.diffusion.num_timesteps:.3f} (t_cut >= {t_min})",
            )
        if reg.num_images > self.config.max_images_per_client:
            raise PolicyError(
                Refusal.RESOURCE_EXHAUSTED,
                f"{reg.num_images} images exceed the quota of {self.config.max_images_per_client}",
            )
        return t_cut

    def check_batch(self, batch: CutBatch, registered_t_cut: int) -> list[str | None]:
        """Per image: None when accepted, else the reason it is refused (the upload guard).

        Refuses uploads that statistically contradict an honest cut image; the module
        docstring lists the tests and what they cannot catch, the helpers above derive each
        bound. Per-message tests refuse every image that passed the per-image tests, so the
        rest of an upload stream goes on.
        """
        if batch.t_cut != registered_t_cut:
            raise PolicyError(
                Refusal.INVALID_ARGUMENT,
                f"upload declares t_cut={batch.t_cut} but this client registered t_cut="
                f"{registered_t_cut}",
            )
        if tuple(batch.cuts.shape[1:]) != self.image.shape:
            raise PolicyError(
                Refusal.INVALID_ARGUMENT,
                f"cut images have shape {list(batch.cuts.shape[1:])}, the server expects "
                f"{list(self.image.shape)}",
            )
        n = int(batch.cuts.shape[0])
        if n == 0:
            return []
        t = registered_t_cut
        abar = self.diffusion.alpha_bar(t)
        expected = math.sqrt(1.0 - abar)
        pixels = math.prod(self.image.shape)
        bounds = cut_bounds(abar, pixels)
        at = f"t_cut={t} (abar={abar:.3f})"

        # float32 throughout (the wire's own type): the bounds leave slack far above its
        # rounding, and the guard runs at memory speed, not at float64's half of it.
        flat = batch.cuts.detach().reshape(n, pixels).to(torch.float32)  # (N, D)
        total = flat.sum(dim=1)  # (N,); finite unless a value is (or the sum overflows)
        finite = torch.isfinite(total)
        if not bool(finite.all()):
            finite = torch.isfinite(flat).all(dim=1)
            flat = torch.where(finite[:, None], flat, 0.0)  # keeps the statistics finite
            total = flat.sum(dim=1)
        peak = flat.abs().amax(dim=1)  # (N,)
        mean = total / pixels  # (N,)
        var = (flat - mean[:, None]).square().mean(dim=1)  # (N,), centred: no cancellation
        images = flat.reshape(batch.cuts.shape)
        floor = guard_ratio(self.config.guard_tolerance, self.image.shape) * expected
        quiet = noise_below(images, floor)  # (N,)

        def noise(i: int) -> float:  # only refused images need the estimate itself
            return float(measure_noise_std(images[i : i + 1])[0])

        # Per image, in order; an image gets the reason of the first test it fails.
        tests: list[tuple[Tensor, Callable[[int], str]]] = [
            (
                ~finite,
                lambda i: "contains NaN or infinite values: send finite float32 cut images",
            ),
            (
                peak > bounds.amplitude,
                lambda i: (
                    f"pixel value {float(peak[i]):.3g} exceeds {bounds.amplitude:.3f}, the most "
                    f"an image in [-1, 1] noised to {at} reaches: scale images to [-1, 1]"
                ),
            ),
            (
                mean.abs() > bounds.mean,
                lambda i: (
                    f"mean {float(mean[i]):.3f} is outside +-{bounds.mean:.3f}, the range of an "
                    f"image in [-1, 1] noised to {at}: scale images to [-1, 1]"
                ),
            ),
            (
                var > bounds.var_high,
                lambda i: (
                    f"variance {float(var[i]):.3f} is above {bounds.var_high:.3f}, the most an "
                    f"image in [-1, 1] noised to {at} shows: scale images to [-1, 1] and use "
                    f"noise std sqrt(1 - abar) = {expected:.3f}"
                ),
            ),
            (
                var < bounds.var_low,
                lambda i: (
                    f"variance {float(var[i]):.3f} is below {bounds.var_low:.3f}, the least the "
                    f"noise of {at} gives: this looks like a clean or under-noised image"
                ),
            ),
            (
                quiet,
                lambda i: (
                    f"measured noise std {noise(i):.3f} is below {floor:.3f} "
                    f"({floor / expected:.2f} x the {expected:.3f} that t_cut={t} implies): "
                    "this looks like a clean or under-noised image"
                ),
            ),
        ]
        reasons: list[str | None] = [None] * n
        ok = torch.ones(n, dtype=torch.bool)
        for bad, why in tests:
            for i in torch.nonzero(bad & ok).flatten().tolist():
                reasons[i] = why(i)
            ok &= ~bad

        # Per message: pooled variance and kurtosis of the images still accepted. Whole
        # messages are tested because their pixels pin the noise level and shape far tighter
        # than one image's. They run before the duplicate test, whose reason would mislead on
        # under-noised images (those lie close to each other too).
        kept = torch.nonzero(ok).flatten()
        m = int(kept.numel())
        if m == 0:
            return reasons
        verdict: str | None = None
        low, high = pooled_variance_bounds(abar, pixels, m)
        pooled = float(var[kept].double().mean())
        chosen = flat if m == n else flat[kept]
        if pooled < low:
            verdict = (
                f"the upload's mean variance {pooled:.3f} is below {low:.3f}, the least the noise "
                f"of {at} gives over {m} images: these look like clean or under-noised images"
            )
        elif pooled > high:
            verdict = (
                f"the upload's mean variance {pooled:.3f} is above {high:.3f}, the most {m} "
                f"images in [-1, 1] noised to {at} show: scale images to [-1, 1] and use noise "
                f"std {expected:.3f}"
            )
        elif m * pixels >= KURTOSIS_MIN_PIXELS:
            k_low, k_high = kurtosis_window(abar, m * pixels)
            kurt = excess_kurtosis(chosen)
            if not k_low <= kurt <= k_high:
                tails = "lighter" if kurt < k_low else "heavier"
                verdict = (
                    f"the upload's excess kurtosis {kurt:.2f} is outside [{k_low:.2f}, "
                    f"{k_high:.2f}]: the noise is {tails}-tailed than Gaussian; draw it from "
                    "N(0, 1)"
                )
        if verdict is not None:
            for i in kept.tolist():
                reasons[i] = verdict
            return reasons

        # Per message: two ids carrying the same (or nearly the same) tensor share their noise.
        # Independent cuts differ by a (x0_i - x0_j) + s sqrt(2) N(0, I): their squared
        # distance is 2 s^2 times a noncentral chi-square(pixels), never below the central
        # one, with the budget split over the m (m - 1) / 2 pairs.
        if m >= 2:
            pairs = m * (m - 1) / 2
            too_close = 2.0 * expected**2 * chi2_quantile(pixels, FALSE_REFUSAL / pairs, False)
            dist, other = nearest_other(chosen, [batch.image_ids[i] for i in kept.tolist()])
            for j in torch.nonzero(dist < too_close).flatten().tolist():
                twin = batch.image_ids[int(kept[int(other[j])])]
                reasons[int(kept[j])] = (
                    f"nearly the same tensor as image {twin[:40]!r} in this upload (squared "
                    f"distance {float(dist[j]):.3g} < {too_close:.3g}): draw independent noise "
                    "for every image"
                )
        return reasons
