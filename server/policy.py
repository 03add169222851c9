"""Server policy: which registrations and uploads are refused, and the raw-image guard."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

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


class PolicyError(Exception):
    """A request the server refuses; `kind` chooses the status code, the message says why."""

    def __init__(self, kind: Refusal, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def measure_noise_std(images: Tensor) -> Tensor:
    """Robust per-image noise std: the MAD of horizontal and vertical finite differences.

    A difference of two pixels carries sqrt(2) times the pixel noise, while the image's own
    differences are sparse (flat regions), so the median ignores edges. Shape (N,C,H,W) -> (N,).
    """
    dx = (images[..., :, 1:] - images[..., :, :-1]).flatten(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).flatten(1)
    d = torch.cat([dx, dy], dim=1)
    mad = (d - d.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    return mad / _MAD_TO_STD / math.sqrt(2.0)


def guard_ratio(tolerance: float, shape: tuple[int, int, int]) -> float:
    """Share of the declared noise std an upload must show, given the image size.

    On pure noise the estimate's relative spread is about 1.45 / sqrt(number of differences)
    (measured); the floor stays 4.5 spreads below 1 so honest uploads are not refused. On
    28x28 images that is the configured tolerance; on 8x8 images it drops to about 0.38.
    """
    c, h, w = shape
    spread = 1.45 / math.sqrt(c * (h * (w - 1) + (h - 1) * w))
    return max(0.0, min(tolerance, 1.0 - 4.5 * spread))


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
        """Per image: None when accepted, else the reason it is refused (the raw-image guard)."""
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
        expected = math.sqrt(1.0 - self.diffusion.alpha_bar(registered_t_cut))
        measured = measure_noise_std(batch.cuts)
        floor = guard_ratio(self.config.guard_tolerance, self.image.shape) * expected
        return [
            None
            if m >= floor
            else (
                f"measured noise std {m:.3f} is below {floor:.3f} "
                f"({floor / expected:.2f} x the {expected:.3f} that "
                f"t_cut={registered_t_cut} implies): this looks like a clean or under-noised image"
            )
            for m in measured.tolist()
        ]
