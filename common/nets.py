"""The denoiser networks: diffusers UNet2DModel on both sides, the server's client-conditioned."""

from __future__ import annotations

import logging
import os
import warnings
from typing import cast

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from collafuse.common.config import (
    DEVICE_CHOICES,
    DeviceError,
    ImageConfig,
    UNetConfig,
    check_device,
)

log = logging.getLogger("collafuse.device")


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


def _no_gpu_reason() -> str | None:
    """Why torch sees no usable GPU, in words a person can act on; None when it sees one."""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    # torch explains a failed CUDA initialisation (no driver, a driver too old for this build)
    # only in a warning, once per process: catch it to put it in our message.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    runtime = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
    reason = f"PyTorch {torch.__version__} (built for {runtime}) sees no GPU"
    details = [str(w.message).strip() for w in caught if "CUDA" in str(w.message)]
    if details:
        reason += f": {details[0]}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        reason += f" (CUDA_VISIBLE_DEVICES={visible!r})"
    return reason


def _describe_gpu(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"


def pick_device(choice: str) -> torch.device:
    """The torch device for a config's `device` (auto, cpu, cuda or cuda:N), logged loudly.

    auto takes GPU 0 when one is usable and otherwise the CPU with a warning, since a server
    that silently trains on the CPU of a GPU machine is a mistake that costs hours. cuda and
    cuda:N raise DeviceError when that GPU is not usable, naming why.
    """
    try:
        choice = check_device(choice)
    except ValueError as exc:
        raise DeviceError(f"{exc}, not {choice!r}") from None
    if choice == "cpu":
        log.info("device cpu (as configured)")
        return torch.device("cpu")
    reason = _no_gpu_reason()
    if choice == "auto":
        if reason is not None:
            log.warning(
                "device auto: no usable GPU (%s); running on the CPU, which trains and samples "
                'far more slowly. Set device = "cpu" to make this the plan, or "cuda" to refuse '
                "to start without a GPU",
                reason,
            )
            return torch.device("cpu")
        index = 0
    else:
        if reason is not None:
            raise DeviceError(
                f"device {choice!r} is not usable: {reason}. Install a CUDA build of PyTorch "
                "for this machine's driver (README, Install) and check that nvidia-smi lists "
                'the GPU, or set device = "auto" or "cpu" (--device cpu)'
            )
        index = int(choice.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = "1 GPU, cuda:0" if count == 1 else f"{count} GPUs, cuda:0 to cuda:{count - 1}"
            raise DeviceError(
                f"device {choice!r} is not usable: this machine shows {gpus}"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
                + f"; choose one of them, or another device ({DEVICE_CHOICES})"
            )
    # Code that names only "cuda" (autocast, synchronize, memory statistics) then means this GPU.
    torch.cuda.set_device(index)
    log.info("device %s -> cuda:%d (%s)", choice, index, _describe_gpu(index))
    return torch.device("cuda", index)
