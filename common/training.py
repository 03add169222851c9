"""The training loop both sides share: fused AdamW, EMA, clipping, seeded steps, non-finite skips.

The server's trainer (bridge loss on cut images) and the client's (eps loss on its own images)
differ in their data and loss only; everything a step does after the loss is here, once.
"""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from collafuse.common.nets import ema_update

CLIP_NORM = 1.0
"""Gradients are clipped to this global norm."""


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as the loop runs it: fused, so a step can be dropped on the device (found_inf)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load optimizer state, keeping the fused implementation.

    A state dict carries its param groups' options, and a checkpoint written before the loop
    used the fused AdamW would switch it back to one that cannot skip a step on the device.
    """
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = True
        group["foreach"] = None


class TrainLoop:
    """Model, EMA copy, optimizer and step counter, and the update that follows a loss.

    Nothing in `update` reads a device value back to the host, so a GPU never waits for the
    Python thread: a step with a non-finite loss or gradient norm is dropped by the fused
    optimizer (found_inf) and counted on the device; the EMA still takes its step, towards
    unchanged weights. The loss of the last kept step and the count are read on demand.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        ema_decay: float,
        seed: int,
        device: torch.device,
    ) -> None:
        self.device = device
        self.model = model.to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = make_optimizer(self.model, lr, weight_decay)
        self.ema_decay = ema_decay
        self.seed = seed
        self.step = 0
        self._generator = torch.Generator(device)
        self._last_loss = torch.tensor(math.nan, device=device)
        self._skipped = torch.zeros((), dtype=torch.long, device=device)

    def generator(self) -> torch.Generator:
        """The step's generator on the device, seeded by (seed, step): a resumed run draws what
        an uninterrupted one would."""
        return self._generator.manual_seed(self.seed * 1_000_003 + self.step)

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA, full precision elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def update(self, loss: Tensor) -> Tensor:
        """Backward, clip, AdamW (skipped on the device when not finite), EMA; step += 1.

        Returns the loss, detached, as a 0-d tensor on the device.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.float()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM, foreach=True)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        self.optimizer.step()
        ema_update(self.ema, self.model, self.ema_decay)
        self._skipped += bad
        self._last_loss = torch.where(bad, self._last_loss, loss.detach())
        self.step += 1
        return loss.detach()

    @property
    def last_loss(self) -> float:
        """The loss of the last step that was not skipped (NaN before the first)."""
        return float(self._last_loss)

    @last_loss.setter
    def last_loss(self, value: float) -> None:
        self._last_loss = torch.tensor(value, device=self.device)

    @property
    def skipped(self) -> int:
        """Steps dropped for a non-finite loss or gradient norm since this loop was built."""
        return int(self._skipped)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loop."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "last_loss": self.last_loss,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Resume from `state()` as saved in a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        self.last_loss = float(state.get("last_loss", math.nan))
