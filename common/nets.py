"""The denoiser networks: diffusers UNet2DModel on both sides, the server's client-conditioned."""

from __future__ import annotations

from typing import cast

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from collafuse.common.config import ImageConfig, UNetConfig


def build_unet(
    config: UNetConfig, image: ImageConfig, num_class_embeds: int | None = None
) -> nn.Module:
    """A UNet2DModel predicting eps; `num_class_embeds` adds a learned embedding per label."""
    levels = len(config.block_out_channels)
    down = tuple(
        "AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in range(levels)
    )
    up = tuple(
        "AttnUpBlock2D" if (levels - 1 - i) in config.attention_levels else "UpBlock2D"
        for i in range(levels)
    )
    model = UNet2DModel(
        sample_size=image.size,
        in_channels=image.channels,
        out_channels=image.channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )
    # diffusers' lazy imports hide that UNet2DModel is an nn.Module from the type checker.
    return cast(nn.Module, model)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class UNetDenoiser:
    """Adapts a UNet2DModel to the `(x_t, t) -> eps_hat` callable the diffusion math takes."""

    def __init__(self, model: nn.Module, labels: Tensor | None = None) -> None:
        self.model = model
        self.labels = labels  # (B,) int64 condition per sample, or None when unconditioned

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        out: Tensor = self.model(x_t, t.to(x_t.device), class_labels=self.labels).sample
        return out


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, as one fused foreach op over all parameters.

    One kernel launch per step instead of one per tensor, which matters on a GPU.
    """
    with torch.no_grad():
        ema_params: list[torch.Tensor] = list(ema.parameters())
        model_params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(model_params):
            raise ValueError("the EMA copy and the model have different parameters")
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(bm)


def pick_device(choice: str) -> torch.device:
    """auto takes CUDA when present, CPU otherwise."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")
