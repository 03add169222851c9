"""What each arm costs: counted FLOPs per training step and per sampled image, seconds and bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from collafuse.common.config import ImageConfig, UNetConfig
from collafuse.common.metrics import count_flops
from collafuse.common.nets import build_unet


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one network at the study's batch size."""

    train_step: int
    """One training step (forward and backward) on a batch."""
    forward_one: int
    """One forward pass on one image: a sampling step."""


class FlopBook:
    """Counts each network's FLOPs once (PyTorch's FlopCounterMode) and remembers them."""

    def __init__(self, image: ImageConfig, batch_size: int, num_timesteps: int) -> None:
        self.image = image
        self.batch_size = batch_size
        self.num_timesteps = num_timesteps
        self._seen: dict[str, ModelFlops] = {}

    def of(self, model: UNetConfig, classes: int | None) -> ModelFlops:
        """FLOPs of `model` (with `classes` label embeddings, if any)."""
        key = f"{model.model_dump_json()}-{classes}"
        if key not in self._seen:
            net = build_unet(model, self.image, classes)
            b = self.batch_size
            x = torch.randn(b, *self.image.shape)
            t = torch.randint(1, self.num_timesteps, (b,))
            labels = torch.zeros(b, dtype=torch.long) if classes else None

            def train_step() -> None:
                net(x, t, class_labels=labels).sample.pow(2).mean().backward()

            def forward_one() -> None:
                with torch.no_grad():
                    net(x[:1], t[:1], class_labels=None if labels is None else labels[:1])

            self._seen[key] = ModelFlops(count_flops(train_step), count_flops(forward_one))
        return self._seen[key]


def cost_record(
    client_train: int,
    server_train: int,
    client_synth: int,
    server_synth: int,
    client_train_s: float,
    synth_s: float,
    bytes_up: int,
    bytes_down: int,
    server_train_s: float = 0.0,
    bytes_model_down: int = 0,
    client_train_steps: int = 0,
) -> dict[str, Any]:
    """One arm's cost as saved in its result: FLOPs are per client (train) and per image (synth)."""
    return {
        "client_train_gflops": round(client_train / 1e9, 3),
        "server_train_gflops": round(server_train / 1e9, 3),
        "client_synth_mflops_per_image": round(client_synth / 1e6, 3),
        "server_synth_mflops_per_image": round(server_synth / 1e6, 3),
        "client_train_steps": client_train_steps,
        "client_train_s": round(client_train_s, 2),
        "server_train_s": round(server_train_s, 2),
        "synth_s": round(synth_s, 2),
        "bytes_up_per_client": bytes_up,
        "bytes_down_per_image": bytes_down,
        "bytes_model_down_per_client": bytes_model_down,
    }
